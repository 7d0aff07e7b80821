"""Tiny offline components and fixture loaders shared by the tests."""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from diffusers_microdit import (
    EDMHeunScheduler,
    MicroDiTPipeline,
    MicroDiTTransformer2DModel,
    configure_openclip_tokenizer,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = REPO_ROOT.parent / "shared" / "fixtures"
MICRODIT_FIXTURES = FIXTURES / "microdit"


def load_microdit_fixture() -> tuple[dict, dict, dict]:
    """(sidecar JSON, original state dict, io tensors) of the original-implementation golden outputs."""
    sidecar = json.loads((MICRODIT_FIXTURES / "microdit_public.json").read_text())
    state_dict = load_file(MICRODIT_FIXTURES / "microdit_public_state_dict.safetensors")
    io = load_file(MICRODIT_FIXTURES / "microdit_public_io.safetensors")
    return sidecar, state_dict, io


def fixture_transformer() -> MicroDiTTransformer2DModel:
    sidecar, state_dict, _ = load_microdit_fixture()
    return MicroDiTTransformer2DModel.from_original(state_dict, sidecar["constructor"]["kwargs"])


def randomize_(module: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> torch.nn.Module:
    """Overwrite every parameter with seeded noise, so zero-initialised output layers do not hide bugs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * scale
            param.copy_(noise + 1.0 if "norm" in name else noise)
    return module


def tiny_transformer(**overrides) -> MicroDiTTransformer2DModel:
    config = dict(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        hidden_size=32,
        num_layers=3,
        attention_head_dim=8,
        caption_channels=32,
        multiple_of=16,
        patch_mixer_layers=2,
        patch_mixer_hidden_size=24,
        num_experts=4,
    )
    config.update(overrides)
    return randomize_(MicroDiTTransformer2DModel(**config)).eval()


def tiny_clip_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    """Character-level CLIP BPE tokenizer built in code (no download), padded like open_clip (id 0)."""
    symbols = ["!"] + list(string.ascii_lowercase) + [c + "</w>" for c in string.ascii_lowercase + ",."]
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)
    return configure_openclip_tokenizer(tokenizer)


def tiny_clip_text_encoder(hidden_size: int = 32, vocab_size: int = 57) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    return CLIPTextModel(config).eval()


def tiny_vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 8),
        norm_num_groups=4,
        latent_channels=4,
        sample_size=16,
    ).eval()


def tiny_pipeline(transformer: MicroDiTTransformer2DModel | None = None) -> MicroDiTPipeline:
    tokenizer = tiny_clip_tokenizer()
    pipe = MicroDiTPipeline(
        transformer=transformer or tiny_transformer(),
        vae=tiny_vae(),
        text_encoder=tiny_clip_text_encoder(vocab_size=len(tokenizer)),
        tokenizer=tokenizer,
        scheduler=EDMHeunScheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# Every pipeline family of the package, for tests that run the same checks on each (LoRA, Hub, Space).
PIPELINE_FAMILIES = ("microdit", "pixart_kv", "lit")


def tiny_family_pipeline(family: str):
    """A fresh tiny pipeline of one of `PIPELINE_FAMILIES`: same weights on every call, progress bar off."""
    if family == "microdit":
        return tiny_pipeline()
    if family == "pixart_kv":
        from test_pixart_kv import tiny_pixart_components  # the PixArt builders live with the PixArt tests

        from diffusers_microdit import PixArtSigmaKVPipeline

        pipe = PixArtSigmaKVPipeline(**tiny_pixart_components())
        pipe.set_progress_bar_config(disable=True)
        return pipe
    if family == "lit":
        from test_pixart_kv import tiny_pixart_components

        from diffusers_microdit import LiTPipeline, LiTTransformer2DModel

        components = tiny_pixart_components()
        torch.manual_seed(0)
        components["transformer"] = LiTTransformer2DModel.from_pixart(components["transformer"])
        pipe = LiTPipeline(**components)
        pipe.set_progress_bar_config(disable=True)
        return pipe
    raise ValueError(f"Unknown pipeline family {family!r}; known: {PIPELINE_FAMILIES}.")


def tiny_family_call_kwargs(family: str) -> dict:
    """JSON-able `__call__` arguments for a fast numpy-image generation with `tiny_family_pipeline(family)`."""
    if family == "microdit":
        return dict(prompt="a red circle", num_inference_steps=2, output_type="np")
    from test_pixart_kv import GENERATE

    return dict(prompt="a photo of a red cat", height=32, width=48, use_resolution_binning=False, **GENERATE)


def train_on_fixed_batch(model: torch.nn.Module, compute_loss, batch: dict, steps: int) -> list[float]:
    """`steps` AdamW steps (lr 1e-3) of a training script's `compute_loss` on one batch with the same random draws
    every step; returns the losses."""
    from diffusers_microdit.training.trainer import BatchRandomness

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch_size = len(batch["latents"])
    losses = []
    for _ in range(steps):
        loss = compute_loss(model, batch, BatchRandomness(0, 0, 0, 1, batch_size, "cpu"))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses
