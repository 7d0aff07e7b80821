#!/usr/bin/env python
"""Does a shapes MicroDiT's cross-attention bind caption words to the objects they name?

For the held-out two-object, colour-attribution and position captions, the script generates each image, detects its
objects with ShapesEval, then noises the generated latents again at each --sigmas level and runs the transformer once
with a processor that records the cross-attention weights of every backbone block (heads and blocks averaged). For
every shape or colour word whose phrase has exactly one matching object (by shape) next to exactly one other, it
compares the attention mass that word receives from the latent cells near its own object with the mass from the
cells near the other object:

    own share = own mass / (own mass + other mass)      0.5 = chance, 1 = perfect binding

Printed per noise level: the mean own share of shape words and colour words (with their counts) and where the
attention goes along the caption: its opening token ([CLS]/BOS), the words, its closing token ([SEP]/EOS), padding.

    python benchmarks/caption_binding.py demo-output/pipeline
"""

import argparse
from collections import defaultdict

import numpy as np
import torch
from diffusers import DiffusionPipeline

import diffusers_microdit  # noqa: F401  (registers the package's classes with diffusers)
from diffusers_microdit.data.shapes import COLORS, SHAPES, held_out_prompts, parse_caption
from diffusers_microdit.data.shapes_eval import ShapesEval
from diffusers_microdit.models.microdit_layers import MicroDiTAttnProcessor

BINDING_CATEGORIES = ("two_object", "color_attr", "position")


class RecordingAttnProcessor(MicroDiTAttnProcessor):
    """MicroDiT's attention written out (softmax(QK^T / sqrt(d)) V, same QK-norm), keeping the head-averaged
    weights (B, queries, keys) in `self.weights`; the SDPA kernels do not return them."""

    def __init__(self):
        self.weights: list[torch.Tensor] = []

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query = attn.norm_q(attn.to_q(hidden_states)).unflatten(-1, (attn.heads, -1)).transpose(1, 2)
        key = attn.norm_k(attn.to_k(context)).unflatten(-1, (attn.heads, -1)).transpose(1, 2)
        value = attn.to_v(context).unflatten(-1, (attn.heads, -1)).transpose(1, 2)
        logits = query @ key.transpose(-1, -2) / query.shape[-1] ** 0.5
        if attention_mask is not None:
            logits = logits.masked_fill(~attention_mask, float("-inf"))
        weights = logits.softmax(dim=-1)
        self.weights.append(weights.mean(dim=1))
        return attn.to_out[0]((weights @ value).transpose(1, 2).flatten(2))


def mass_near(attention: np.ndarray, center: tuple[float, float], cell_pixels: float, radius: float) -> float:
    """Sum of a (rows, cols) map of per-cell attention over the cells whose centres lie within `radius` cells of
    `center` (in pixels)."""
    rows, cols = attention.shape
    y, x = np.mgrid[0:rows, 0:cols] + 0.5
    cx, cy = center[0] / cell_pixels, center[1] / cell_pixels
    return float(attention[(x - cx) ** 2 + (y - cy) ** 2 <= radius**2].sum())


def own_shares(attention: np.ndarray, tokens: list[str], caption, detections, cell_pixels: float, radius: float):
    """(word kind, own share) for each shape/colour word of `caption` that can be judged: its phrase's shape was
    detected exactly once, next to exactly one other object. `attention` is (rows, cols, caption tokens)."""
    shares = []
    for phrase in caption.phrases:
        own = [d for d in detections if d.shape == phrase.shape]
        other = [d for d in detections if d.shape != phrase.shape]
        if len(own) != 1 or len(other) != 1:
            continue
        for kind, word in (("shape", phrase.shape), ("colour", phrase.color)):
            if word is None or word not in tokens:
                continue
            word_map = attention[..., tokens.index(word)]
            word_map = word_map / max(word_map.sum(), 1e-12)
            mine = mass_near(word_map, own[0].center, cell_pixels, radius)
            theirs = mass_near(word_map, other[0].center, cell_pixels, radius)
            if mine + theirs > 0:
                shares.append((kind, mine / (mine + theirs)))
    return shares


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pipeline", help="A MicroDiT pipeline folder trained on the shapes task (make demo's).")
    parser.add_argument("--per_category", type=int, default=30, help="Held-out captions per category.")
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.3, 1.0, 3.0])
    parser.add_argument("--radius", type=float, default=1.5, help="Cells around an object's centre that count.")
    parser.add_argument("--num_inference_steps", type=int, default=10)
    parser.add_argument("--guidance_scale", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if min(args.sigmas) <= 0 or args.per_category < 1 or args.radius <= 0:
        parser.error("--sigmas and --radius must be positive and --per_category at least 1.")
    return args


@torch.no_grad()
def main(argv=None) -> dict:
    args = parse_args(argv)
    pipe = DiffusionPipeline.from_pretrained(args.pipeline)
    pipe.set_progress_bar_config(disable=True)
    transformer, tokenizer = pipe.transformer, pipe.tokenizer
    prompts = [p for p in held_out_prompts(args.per_category) if parse_caption(p).category in BINDING_CATEGORIES]
    generator = torch.Generator().manual_seed(args.seed)
    latents = pipe(
        prompts, num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
        generator=generator, output_type="latent",
    ).images  # fmt: skip
    images = pipe.image_processor.postprocess(pipe.decode_latents(latents), output_type="pil")
    scorer = ShapesEval()
    detections = [[d for d in scorer.detect(image) if d.shape is not None] for image in images]
    embeds, caption_mask, _, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False)
    tokenized = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True)
    tokens = [tokenizer.convert_ids_to_tokens(row) for row in tokenized.input_ids]
    lengths = [sum(row) for row in tokenized.attention_mask]  # tokens before the padding, end token included

    recorder = RecordingAttnProcessor()
    for block in transformer.transformer_blocks:
        block.attn2.set_processor(recorder)
    rows, cols = (side // transformer.config.patch_size for side in latents.shape[-2:])
    cell_pixels = pipe.vae_scale_factor * transformer.config.patch_size
    sigma_data = pipe.scheduler.config.sigma_data
    report = {}
    for sigma in args.sigmas:
        recorder.weights.clear()
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(args.seed + 1))
        noisy = latents + sigma * noise
        transformer(
            noisy / (sigma**2 + sigma_data**2) ** 0.5, torch.full((len(prompts),), float(np.log(sigma) / 4)), embeds,
            encoder_attention_mask=caption_mask,
        )  # fmt: skip
        attention = torch.stack(recorder.weights).mean(dim=0).reshape(len(prompts), rows, cols, -1).numpy()
        shares, spread = defaultdict(list), defaultdict(list)
        for b, prompt in enumerate(prompts):
            caption = parse_caption(prompt)
            for kind, share in own_shares(attention[b], tokens[b], caption, detections[b], cell_pixels, args.radius):
                shares[kind].append(share)
            per_token = attention[b].mean(axis=(0, 1))
            spread["caption start"].append(per_token[0])
            spread["words"].append(per_token[1 : lengths[b] - 1].sum())
            spread["caption end"].append(per_token[lengths[b] - 1])
            spread["padding"].append(per_token[lengths[b] :].sum())
        report[sigma] = {
            **{f"{kind} own share": (float(np.mean(v)), len(v)) for kind, v in sorted(shares.items())},
            **{f"attention on {part}": float(np.mean(v)) for part, v in spread.items()},
        }
        print(f"sigma {sigma:g}: " + ", ".join(
            f"{name} {value[0]:.3f} (n={value[1]})" if isinstance(value, tuple) else f"{name} {value:.3f}"
            for name, value in report[sigma].items()
        ))  # fmt: skip
    return report


if __name__ == "__main__":
    main()
