#!/usr/bin/env python
"""Run a MicroDiT training recipe (examples/recipes/*.json): its stages one after the other, each a train_microdit.py
run that starts from the previous stage's output (`--init_from`, and `--resume_optimizer_state` where the recipe
continues the optimizer), inside one `accelerate launch`:

    accelerate launch --num_processes 8 examples/train_microdit_recipe.py --recipe examples/recipes/microdit_paper.json \\
        --init_from BASE --train_data_dir images/ --output_dir runs/paper

BASE is a MicroDiT pipeline folder (VAE, text encoder, tokenizer, scheduler; stage 1 builds a new transformer).
Every other flag (data flags, overrides such as --report_to) is passed on to every stage, after the recipe's own,
so it wins. Stage k writes --output_dir/<stage name>; raw data is encoded once per resolution into
--output_dir/cache. Rerunning the same command continues: finished stages are kept, an interrupted one resumes from
its newest checkpoint.

--print_commands prints the equivalent one-command-per-stage `accelerate launch examples/train_microdit.py ...`
lines instead (the README's training section is that output). --steps_scale and --resolution_scale shrink the
recipe's steps and image sizes while keeping its shape (the CI test runs the paper recipe this way).
"""

import argparse
import json
import shlex
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCALED_STEPS = ("--max_train_steps", "--lr_warmup_steps", "--checkpointing_steps")


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True, help="A recipe JSON file (examples/recipes/).")
    parser.add_argument("--init_from", required=True, help="The MicroDiT pipeline stage 1 starts from.")
    parser.add_argument("--output_dir", required=True, help="One subfolder per stage, and the encoded data.")
    parser.add_argument(
        "--transformer_config", default=None,
        help="Replace the recipe's new transformer (a preset or a JSON file of MicroDiTTransformer2DModel arguments).",
    )
    parser.add_argument("--steps_scale", type=float, default=1.0, help="Multiply the recipe's step counts.")
    parser.add_argument("--resolution_scale", type=float, default=1.0, help="Multiply the recipe's image sizes.")
    parser.add_argument("--print_commands", action="store_true", help="Print one command per stage and stop.")
    parser.add_argument("--num_processes", type=int, default=8, help="For --print_commands: the launch's processes.")
    args, passed_on = parser.parse_known_args(argv)
    if not (0 < args.steps_scale <= 1 and 0 < args.resolution_scale <= 1):
        raise SystemExit("--steps_scale and --resolution_scale must be in (0, 1].")
    return args, passed_on


def recipe_stages(recipe: dict, args: argparse.Namespace) -> list[tuple[str, str, list[list[str]]]]:
    """(stage name, the stage it starts from, its train_microdit.py flags as [flag] or [flag, value]) per stage of
    the recipe, scaled by --steps_scale / --resolution_scale."""
    stages = []
    for stage in recipe["stages"]:
        flags = []
        for flag, value in {**recipe["common"], **stage["args"]}.items():
            if flag in SCALED_STEPS:
                value = max(1, round(value * args.steps_scale))
            elif flag == "--resolution":
                value = round(value * args.resolution_scale)
            elif flag == "--transformer_config" and args.transformer_config:
                value = args.transformer_config
            flags.append([flag] if value is True else [flag, str(value)])
        stages.append((stage["name"], stage["from"], flags))
    return stages


def stage_flags(args, name: str, start: str, flags: list[list[str]]) -> list[list[str]]:
    """Where a stage starts and writes, and the recipe's flags (the flags passed on come after these)."""
    output = Path(args.output_dir)
    init_from = args.init_from if start == "base" else str(output / start)
    return [["--init_from", init_from], ["--output_dir", str(output / name)], *flags,
            ["--encoded_cache_dir", str(output / "cache")]]


def print_commands(args, stages, passed_on: list[str]) -> None:
    """One `accelerate launch examples/train_microdit.py` command per stage, a flag per line."""
    for name, start, flags in stages:
        lines = [f"accelerate launch --num_processes {args.num_processes} examples/train_microdit.py"]
        lines += ["    " + shlex.join(flag) for flag in stage_flags(args, name, start, flags)]
        if passed_on:
            lines.append("    " + shlex.join(passed_on))
        print(f"# {name}\n" + " \\\n".join(lines))


def main(argv=None) -> None:
    args, passed_on = parse_args(argv)
    stages = recipe_stages(json.loads(Path(args.recipe).read_text()), args)
    if args.print_commands:
        print_commands(args, stages, passed_on)
        return
    sys.path.insert(0, str(HERE))
    from train_microdit import main as train_microdit  # in-process: one launch runs every stage

    for name, start, flags in stages:
        output = Path(args.output_dir) / name
        if (output / "pipeline" / "model_index.json").is_file():
            print(f"{name}: finished earlier, kept ({output / 'pipeline'})")
            continue
        resume = ["--resume_from_checkpoint", "latest"] if output.is_dir() else []
        argv = [part for flag in stage_flags(args, name, start, flags) for part in flag]
        train_microdit([*argv, *passed_on, *resume])


if __name__ == "__main__":
    main()
