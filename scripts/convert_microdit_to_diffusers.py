#!/usr/bin/env python
"""Convert an official MicroDiT checkpoint (Sony micro_diffusion) into a complete diffusers pipeline folder.

Example (the 4-channel 512-px model; files from the Hub repos VSehwag24/MicroDiT and apple/DFN5B-CLIP-ViT-H-14-378):

    python scripts/convert_microdit_to_diffusers.py \
        --checkpoint_path dit_4_channel_37M_real_and_synthetic_data.pt \
        --text_encoder_path apple/DFN5B-CLIP-ViT-H-14-378 \
        --output_path microdit-xl2-4ch-37M

The VAE defaults to the one the checkpoint was trained with (SDXL VAE for 4 latent channels, Ostris 16-channel VAE
for 16). Everything is written as safetensors; the pickled original is read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from diffusers import AutoencoderKL
from huggingface_hub import hf_hub_download
from transformers import CLIPTokenizer

from diffusers_microdit import (
    EDMHeunScheduler,
    MicroDiTPipeline,
    MicroDiTTransformer2DModel,
    configure_openclip_tokenizer,
    convert_openclip_text_encoder,
)

# (repo, subfolder) of the VAE each official checkpoint was trained with, by latent channels.
DEFAULT_VAES = {4: ("stabilityai/stable-diffusion-xl-base-1.0", "vae"), 16: ("ostris/vae-kl-f8-d16", None)}
OPENCLIP_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint_path", required=True, help="Original DiT checkpoint (.pt or .safetensors).")
    parser.add_argument(
        "--original_config",
        default=None,
        help="JSON object of original DiT(...) keyword arguments overriding what is inferred, e.g. '{\"head_dim\": 64}'.",
    )
    parser.add_argument("--vae", default=None, help="diffusers AutoencoderKL folder or Hub id (default: by channels).")
    parser.add_argument("--vae_subfolder", default=None, help="Subfolder of --vae holding the autoencoder.")
    parser.add_argument(
        "--text_encoder_path",
        default="apple/DFN5B-CLIP-ViT-H-14-378",
        help="open_clip checkpoint file, or a Hub repo containing one of " + ", ".join(OPENCLIP_WEIGHT_FILES),
    )
    parser.add_argument("--num_attention_heads", type=int, default=16, help="Text tower heads (16 for DFN5B).")
    parser.add_argument(
        "--tokenizer", default="apple/DFN5B-CLIP-ViT-H-14-378", help="CLIP BPE tokenizer folder or Hub id."
    )
    parser.add_argument("--output_path", required=True, help="Where to write the pipeline folder.")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="Dtype of the saved weights.")
    return parser.parse_args(argv)


def resolve_openclip_file(path_or_repo: str) -> str:
    """A local file as is; otherwise the first open_clip weight file found in that Hub repo."""
    if os.path.isfile(path_or_repo):
        return path_or_repo
    errors = []
    for filename in OPENCLIP_WEIGHT_FILES:
        try:
            return hf_hub_download(path_or_repo, filename)
        except Exception as error:  # noqa: BLE001 - try the next candidate, report all below
            errors.append(f"{filename}: {error}")
    raise FileNotFoundError(f"No open_clip weights at {path_or_repo!r}:\n" + "\n".join(errors))


def main(argv=None) -> None:
    args = parse_args(argv)
    original_config = json.loads(args.original_config) if args.original_config else None
    if original_config is not None and not isinstance(original_config, dict):
        raise SystemExit("--original_config must be a JSON object of DiT keyword arguments.")

    transformer = MicroDiTTransformer2DModel.from_original(args.checkpoint_path, original_config)
    channels = transformer.config.in_channels
    if args.vae is None:
        if channels not in DEFAULT_VAES:
            raise SystemExit(f"No default VAE for {channels} latent channels; pass --vae.")
        args.vae, args.vae_subfolder = DEFAULT_VAES[channels]
    vae = AutoencoderKL.from_pretrained(args.vae, subfolder=args.vae_subfolder)
    if vae.config.latent_channels != channels:
        raise SystemExit(f"The VAE has {vae.config.latent_channels} latent channels, the checkpoint {channels}.")

    text_encoder = convert_openclip_text_encoder(
        resolve_openclip_file(args.text_encoder_path), num_attention_heads=args.num_attention_heads
    )
    if text_encoder.config.hidden_size != transformer.config.caption_channels:
        raise SystemExit(
            f"The text encoder is {text_encoder.config.hidden_size} wide, the transformer expects "
            f"{transformer.config.caption_channels}-channel captions."
        )
    tokenizer = configure_openclip_tokenizer(CLIPTokenizer.from_pretrained(args.tokenizer))

    pipe = MicroDiTPipeline(
        transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=EDMHeunScheduler()
    )
    if args.dtype != "float32":
        pipe.to(DTYPES[args.dtype])
    pipe.save_pretrained(args.output_path, safe_serialization=True)
    print(f"Saved a MicroDiTPipeline ({sum(p.numel() for p in transformer.parameters()):,} transformer parameters) to {args.output_path}")


if __name__ == "__main__":
    main()
