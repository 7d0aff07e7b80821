#!/usr/bin/env python
"""Upload a LoRA or pipeline folder, or a pipeline with a freshly written model card, to a Hugging Face Hub repo.

Examples:

    # A LoRA folder or a folder from `save_pipeline_with_card` (only what it needs is uploaded):
    python scripts/push_to_hub.py my-lora --repo_id me/microdit-origami-lora

    # A pipeline folder (any `save_pretrained` output): write a complete folder with model card and samples first.
    python scripts/push_to_hub.py demo-output/pipeline --repo_id me/microdit-demo --card \
        --training_data "Embedded shapes dataset (1k synthetic images)" --cost "CPU hours=0.1" \
        --sample_prompt "Image of an astronaut riding a horse in Origami style"

The endpoint and token follow `HF_ENDPOINT` and `HF_TOKEN` / `hf auth login` (or pass `--token`).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from diffusers import DiffusionPipeline

from diffusers_microdit.hub import push_folder_to_hub, save_pipeline_with_card


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="Folder to upload (with --card: a pipeline folder to publish).")
    parser.add_argument("--repo_id", required=True, help="Target repo, e.g. 'me/microdit-demo' (created if missing).")
    parser.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the logged-in token).")
    parser.add_argument("--private", action="store_true", help="Create the repo as private.")
    parser.add_argument("--commit_message", default="Upload with diffusers-microdit")

    card = parser.add_argument_group("--card: publish a pipeline folder with a model card")
    card.add_argument("--card", action="store_true", help="Load SOURCE as a pipeline and write it with a card.")
    card.add_argument("--output_dir", type=Path, default=None, help="Keep the written folder here (default: temp).")
    card.add_argument("--base_model", default=None, help="Hub id of the checkpoint this one was finetuned from.")
    card.add_argument("--license", default=None, help="Hub licence id (default: the model family's licence).")
    card.add_argument("--training_data", default=None, help="What the model was trained on.")
    card.add_argument("--description", default=None, help="Opening paragraph of the card.")
    card.add_argument("--cost", nargs="*", default=[], metavar="ITEM=VALUE", help="Training cost rows.")
    card.add_argument("--tag", action="append", default=[], help="Extra Hub tag (repeatable).")
    card.add_argument("--sample_prompt", action="append", default=[], help="Render a sample image (repeatable).")
    card.add_argument("--num_inference_steps", type=int, default=30, help="Steps for the sample images.")
    card.add_argument("--seed", type=int, default=0, help="Seed for the sample images.")
    return parser.parse_args(argv)


def parse_cost(items: list[str]) -> dict[str, str]:
    """`["GPU hours=2.5", "USD=6"]` -> `{"GPU hours": "2.5", "USD": "6"}`."""
    malformed = [item for item in items if "=" not in item]
    if malformed:
        raise SystemExit(f"--cost expects ITEM=VALUE pairs, got {malformed}.")
    return dict(item.split("=", 1) for item in items)


def write_card_folder(args: argparse.Namespace, output_dir: Path) -> Path:
    """Load the pipeline in `args.source`, render the sample prompts, write it with its card to `output_dir`."""
    pipeline = DiffusionPipeline.from_pretrained(args.source)
    samples = []
    if args.sample_prompt:
        generator = torch.Generator().manual_seed(args.seed)
        samples = pipeline(
            args.sample_prompt, num_inference_steps=args.num_inference_steps, generator=generator
        ).images
    return save_pipeline_with_card(
        pipeline,
        output_dir,
        repo_id=args.repo_id,
        base_model=args.base_model,
        license=args.license,
        training_data=args.training_data,
        cost=parse_cost(args.cost) or None,
        sample_images=samples,
        sample_prompts=args.sample_prompt or None,
        description=args.description,
        tags=args.tag,
    )


def main(argv=None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        folder = write_card_folder(args, args.output_dir or Path(scratch)) if args.card else args.source
        repo_id = push_folder_to_hub(
            folder, args.repo_id, token=args.token, private=args.private, commit_message=args.commit_message
        )
    print(f"Uploaded {args.source} to {repo_id}")


if __name__ == "__main__":
    main()
