"""Tiny offline components and fixture loaders shared by the tests."""

from __future__ import annotations

import importlib.util
import json
import os
import string
import subprocess
import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler
from safetensors.torch import load_file
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, PreTrainedTokenizerFast, T5Config, T5EncoderModel

from diffusers_microdit import (
    EDMHeunScheduler,
    LiTPipeline,
    LiTTransformer2DModel,
    MicroDiTPipeline,
    MicroDiTTransformer2DModel,
    PixArtSigmaKVPipeline,
    PixArtSigmaKVTransformer2DModel,
    configure_openclip_tokenizer,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
# Golden outputs of the original implementations, copied byte for byte into the repository (test_fixtures.py
# checks the copy), so a clone passes its tests on its own.
FIXTURES = REPO_ROOT / "tests" / "fixtures"
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


def tiny_pipeline(transformer: MicroDiTTransformer2DModel | None = None, **settings) -> MicroDiTPipeline:
    tokenizer = tiny_clip_tokenizer()
    pipe = MicroDiTPipeline(
        transformer=transformer or tiny_transformer(),
        vae=tiny_vae(),
        text_encoder=tiny_clip_text_encoder(vocab_size=len(tokenizer)),
        tokenizer=tokenizer,
        scheduler=EDMHeunScheduler(),
        **settings,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------------------------------- PixArt family

NO_EXTRA_CONDITIONS = {"resolution": None, "aspect_ratio": None}

TINY_PIXART_CONFIG = dict(
    sample_size=8,
    num_layers=3,
    num_attention_heads=2,
    attention_head_dim=8,
    in_channels=4,
    out_channels=8,
    cross_attention_dim=16,
    caption_channels=8,
    interpolation_scale=1.0,
    use_additional_conditions=False,
)


def tiny_pixart_inputs(height: int = 8, width: int = 12, seed: int = 1) -> dict:
    """Forward inputs for `TINY_PIXART_CONFIG` transformers: 2 latents of `height` x `width`, 5 caption tokens (the
    second caption has 2 masked), two timesteps."""
    generator = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(2, 4, height, width, generator=generator),
        encoder_hidden_states=torch.randn(2, 5, 8, generator=generator),
        encoder_attention_mask=torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]),
        timestep=torch.tensor([10, 700]),
        added_cond_kwargs=NO_EXTRA_CONDITIONS,
    )


def run_transformer(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).sample


def tiny_t5_tokenizer() -> PreTrainedTokenizerFast:
    words = ["<pad>", "</s>", "<unk>", "a", "an", "red", "blue", "cat", "dog", "on", "the", "moon", "photo", "of"]
    backend = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=16
    )


def tiny_pixart_components() -> dict:
    tokenizer = tiny_t5_tokenizer()
    torch.manual_seed(0)
    text_encoder = T5EncoderModel(
        T5Config(vocab_size=len(tokenizer), d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2)
    ).eval()
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),  # vae_scale_factor 8, as the SDXL VAE
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=4,
        sample_size=32,
    ).eval()
    # sample_size 32 selects diffusers' 256-px aspect-ratio bins (PixArt-Σ 256 uses interpolation scale 0.5).
    transformer = PixArtSigmaKVTransformer2DModel(
        **{**TINY_PIXART_CONFIG, "sample_size": 32, "interpolation_scale": 0.5}, kv_compress_layers=[1, 2]
    )
    randomize_(transformer, seed=3).eval()
    return dict(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(),
    )


GENERATE = dict(num_inference_steps=2, max_sequence_length=8, clean_caption=False, output_type="np")


def generate(pipe, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    return pipe("a photo of a red cat", generator=torch.manual_seed(0), **{**GENERATE, **kwargs}).images



# ---------------------------------------------------------------------------------------------- every family

# Every pipeline family of the package, for tests that run the same checks on each (LoRA, Hub, Space).
PIPELINE_FAMILIES = ("microdit", "pixart_kv", "lit")


def tiny_family_pipeline(family: str):
    """A fresh tiny pipeline of one of `PIPELINE_FAMILIES`: same weights on every call, progress bar off."""
    if family == "microdit":
        return tiny_pipeline()
    if family == "pixart_kv":
        pipe = PixArtSigmaKVPipeline(**tiny_pixart_components())
        pipe.set_progress_bar_config(disable=True)
        return pipe
    if family == "lit":
        components = tiny_pixart_components()
        torch.manual_seed(0)
        components["transformer"] = LiTTransformer2DModel.from_pixart(components["transformer"])
        pipe = LiTPipeline(**components)
        pipe.set_progress_bar_config(disable=True)
        return pipe
    raise ValueError(f"Unknown pipeline family {family!r}; known: {PIPELINE_FAMILIES}.")


def add_random_lora(pipe, family: str, adapter_name: str = "style") -> None:
    """Give `pipe.transformer` a LoRA (rank 4, alpha 8) on the family's default targets whose B matrices are random
    too (peft's default zero B would leave the outputs unchanged)."""
    from peft import LoraConfig

    from diffusers_microdit.loaders import MICRODIT_LORA_TARGET_MODULES, PIXART_LORA_TARGET_MODULES

    targets = MICRODIT_LORA_TARGET_MODULES if family == "microdit" else PIXART_LORA_TARGET_MODULES
    torch.manual_seed(7)
    # lora_alpha != r: a loader that lost the saved config would scale the update differently.
    config = LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), init_lora_weights=False)
    pipe.transformer.add_adapter(config, adapter_name=adapter_name)
    with torch.no_grad():
        for name, param in pipe.transformer.named_parameters():
            if "lora_B" in name:
                param.mul_(0.3)  # keep the update moderate so the decoded images do not saturate


def tiny_family_call_kwargs(family: str) -> dict:
    """JSON-able `__call__` arguments for a fast numpy-image generation with `tiny_family_pipeline(family)`."""
    if family == "microdit":
        return dict(prompt="a red circle", num_inference_steps=2, output_type="np")
    return dict(prompt="a photo of a red cat", height=32, width=48, use_resolution_binning=False, **GENERATE)


def train_on_fixed_batch(
    model: torch.nn.Module, compute_loss, batch: dict, steps: int, optimizer: torch.optim.Optimizer | None = None
) -> list[float]:
    """`steps` steps of `optimizer` (default AdamW, lr 1e-3) of a training script's `compute_loss` on one batch with
    the same random draws every step; returns the losses."""
    from diffusers_microdit.training.trainer import BatchRandomness

    optimizer = optimizer or torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch_size = len(batch["latents"])
    losses = []
    for _ in range(steps):
        loss = compute_loss(model, batch, BatchRandomness(0, 0, 0, 1, batch_size, "cpu"))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


# ---------------------------------------------------------------------------------------------- example scripts

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_script(script: str, *args, launcher=(sys.executable,), check=True, env=None) -> subprocess.CompletedProcess:
    command = [*launcher, str(REPO_ROOT / "examples" / script), *map(str, args)]
    result = subprocess.run(command, capture_output=True, text=True, env=env or ENV, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def microdit_train_args(workspace: dict, output_dir, *extra) -> list:
    """train_microdit.py arguments for the `microdit_workspace` fixture (tests/training/conftest.py)."""
    return [
        "--init_from", workspace["base"], "--transformer_config", workspace["config"],
        "--precomputed_dataset", workspace["cache"], "--output_dir", output_dir, "--train_batch_size", 4,
        "--report_to", "none", "--seed", 3, *extra,
    ]


def final_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(output_dir / "pipeline" / "transformer" / "diffusion_pytorch_model.safetensors")


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
