#!/usr/bin/env python
"""LoRA-finetune any pipeline of this package (MicroDiT, PixArt-Sigma / KV-compressed, LiT) with Accelerate.

    accelerate launch examples/train_lora.py --init_from PIPELINE --train_data_dir my-images/ \\
        --rank 16 --learning_rate 1e-4 --max_train_steps 1000 --checkpointing_steps 250 \\
        --validation_prompts "Image of an astronaut riding a horse in Origami style" --output_dir my-lora

PIPELINE is a pipeline folder or Hub id (or a training run's --output_dir). A plain diffusers PixArt-Sigma pipeline
works too: it is trained and saved as a `PixArtSigmaKVPipeline` (the same model without compressed layers), whose
class has the LoRA loaders that `PixArtSigmaPipeline` lacks.

Data: an image-caption `datasets` dataset (--dataset_name, a Hub id or a `save_to_disk` folder) or an image folder
with metadata.jsonl (--train_data_dir) is first encoded with the pipeline's own VAE and text encoder into
--output_dir/cache (resumable; unreadable or caption-less rows are skipped and counted); or pass caches made by
examples/precompute_embeddings.py with --precomputed_dataset. Training is at the pipeline's native resolution.

Objective: the family's own, as in its training script: MicroDiT's EDM loss (unmasked; P_mean/P_std of the
original's stage at this resolution unless --p_mean/--p_std), PixArt-Sigma's epsilon MSE + learned-range
variational bound for PixArt-Sigma, KV-PixArt and LiT. Only the LoRA weights train (float32 under --mixed_precision,
the frozen base in the mixed-precision dtype); see diffusers_microdit/loaders/lora.py for which layers are adapted.

Output in --output_dir: `pytorch_lora_weights.safetensors` and a model card (README.md), loadable with
`pipe.load_lora_weights(output_dir)`; each checkpoint-N folder holds the adapter the same way (so
`pipe.load_lora_weights(output_dir/checkpoint-N)` tries an intermediate step) with the optimizer and schedule
(--resume_from_checkpoint latest); --push_to_hub uploads the adapter and card.
"""

import argparse

from diffusers import DiffusionPipeline, PixArtSigmaPipeline

import diffusers_microdit  # noqa: F401  (registers the package's classes with diffusers)
from diffusers_microdit import (
    LiTPipeline,
    LiTTransformer2DModel,
    MicroDiTPipeline,
    MicroDiTTransformer2DModel,
    PixArtSigmaKVPipeline,
    PixArtSigmaKVTransformer2DModel,
)
from diffusers_microdit.training.args import (
    add_aspect_ratio_bucket_arg,
    add_training_args,
    check_aspect_ratio_bucket_args,
    check_training_args,
    resolve_pipeline_path,
)
from diffusers_microdit.training.data import load_training_data
from diffusers_microdit.training.lora import LoraTrainer, add_lora_adapter, add_lora_args, check_lora_args
from diffusers_microdit.training.losses import microdit_objective, pixart_objective
from diffusers_microdit.training.pixart import null_caption, training_noise_scheduler
from diffusers_microdit.training.precompute import training_caches

# Pipeline found at --init_from -> (pipeline class trained and saved, transformer class loaded).
LORA_PIPELINES = {
    MicroDiTPipeline: (MicroDiTPipeline, MicroDiTTransformer2DModel),
    PixArtSigmaPipeline: (PixArtSigmaKVPipeline, PixArtSigmaKVTransformer2DModel),
    PixArtSigmaKVPipeline: (PixArtSigmaKVPipeline, PixArtSigmaKVTransformer2DModel),
    LiTPipeline: (LiTPipeline, LiTTransformer2DModel),
}
# MicroDiT's EDM noise-level distribution by stage resolution (the original's 256-px and 512-px configs).
MICRODIT_P_MEAN_STD = {256: (-0.6, 1.2), 512: (0.0, 0.6)}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_args(parser, learning_rate=1e-4, weight_decay=1e-2)  # the diffusers LoRA examples' values
    add_lora_args(parser)
    objective = parser.add_argument_group("objective")
    objective.add_argument(
        "--caption_dropout", type=float, default=0.0,
        help="Share of captions replaced by the unconditional caption (keeps classifier-free guidance working).",
    )
    objective.add_argument("--p_mean", type=float, default=None, help="MicroDiT: EDM log-sigma mean.")
    objective.add_argument("--p_std", type=float, default=None, help="MicroDiT: EDM log-sigma std.")
    add_aspect_ratio_bucket_arg(objective)
    parser.set_defaults(lr_scheduler="constant", validation_steps=100)
    args = parser.parse_args(argv)

    errors = check_lora_args(args) + check_aspect_ratio_bucket_args(args)
    if args.pretrained_model_name_or_path is None:
        errors.append("--init_from (or --pretrained_model_name_or_path) is required: the pipeline to adapt.")
    check_training_args(args, errors)
    args.pretrained_model_name_or_path = resolve_pipeline_path(args.pretrained_model_name_or_path)
    return args


def load_pipeline(args) -> DiffusionPipeline:
    """The --init_from pipeline rebuilt around a transformer class that takes peft adapters (see LORA_PIPELINES),
    its VAE and text encoder frozen."""
    path, revision, variant = args.pretrained_model_name_or_path, args.revision, args.variant
    base = DiffusionPipeline.from_pretrained(path, revision=revision, variant=variant, transformer=None)
    if type(base) not in LORA_PIPELINES:
        names = ", ".join(cls.__name__ for cls in LORA_PIPELINES)
        raise SystemExit(f"--init_from is a {type(base).__name__}; LoRA training takes a {names}.")
    pipeline_class, transformer_class = LORA_PIPELINES[type(base)]
    transformer = transformer_class.from_pretrained(path, subfolder="transformer", revision=revision, variant=variant)
    for frozen in (base.vae, base.text_encoder):
        frozen.requires_grad_(False).eval()
    # Settings the pipeline saved besides its components (MicroDiT's mask_caption_padding) carry over.
    _, settings = base._get_signature_keys(pipeline_class)
    kept = {name: base.config[name] for name in settings if name in base.config}
    return pipeline_class(**{**base.components, **kept, "transformer": transformer})


def make_compute_loss(args, pipeline, first_row: dict, resolution: int):
    """The family's objective (`compute_loss(model, batch, draws)`) at `resolution` px."""
    if isinstance(pipeline, MicroDiTPipeline):
        nearest_stage = min(MICRODIT_P_MEAN_STD, key=lambda size: abs(size - resolution))
        p_mean, p_std = MICRODIT_P_MEAN_STD[nearest_stage]
        return microdit_objective(
            pipeline.scheduler, mask_ratio=0.0, masking="none",
            p_mean=p_mean if args.p_mean is None else args.p_mean, p_std=p_std if args.p_std is None else args.p_std,
            caption_dropout=args.caption_dropout,
        )
    null_embeds, null_mask = null_caption(pipeline, first_row["prompt_embeds"].shape[0])
    return pixart_objective(training_noise_scheduler(pipeline), null_embeds, null_mask, args.caption_dropout)


def main(argv=None) -> None:
    args = parse_args(argv)
    trainer = LoraTrainer(args)
    pipeline = load_pipeline(args)
    transformer = pipeline.transformer
    native = transformer.config.sample_size * pipeline.vae_scale_factor
    resolution = args.resolution or native
    if resolution != native:
        raise SystemExit(
            f"The pipeline is a {native}-px model and --resolution is {resolution}: LoRA trains at the model's "
            "resolution (train another resolution first with the family's train_*.py script)."
        )
    cache_dirs = training_caches(args, pipeline, trainer.accelerator, resolution)
    dataset, collate_fn, batch_sampler = load_training_data(args, resolution, pipeline, transformer, cache_dirs)
    compute_loss = make_compute_loss(args, pipeline, next(iter(dataset)), resolution)
    config = add_lora_adapter(transformer, args, trainer.weight_dtype)
    trainer.accelerator.print(
        f"LoRA rank {config.r} (alpha {config.lora_alpha}) on {type(transformer).__name__} "
        f"[{', '.join(sorted(config.target_modules))}] at {resolution} px"
    )

    def build_pipeline(model) -> DiffusionPipeline:
        return type(pipeline)(**{**pipeline.components, "transformer": model})

    trainer.prepare(transformer, dataset, compute_loss, collate_fn, batch_sampler)
    trainer.train(build_pipeline)
    trainer.finish(build_pipeline)


if __name__ == "__main__":
    main()
