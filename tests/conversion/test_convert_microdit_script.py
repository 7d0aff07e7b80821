"""scripts/convert_microdit_to_diffusers.py end to end: original files in, a loadable pipeline folder out."""

import json
import subprocess
import sys

import numpy as np
import torch
from helpers import REPO_ROOT, load_microdit_fixture, tiny_clip_tokenizer, tiny_vae
from safetensors.torch import save_file

from diffusers_microdit import MicroDiTPipeline


def fake_openclip_text_tower(vocab_size: int, width: int = 32, layers: int = 2, embed_dim: int = 24) -> dict:
    """Random weights with open_clip's text-tower key names and shapes (plus the vision keys a full CLIP has)."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape, scale=0.05):
        return torch.randn(*shape, generator=g) * scale

    tower = {
        "token_embedding.weight": rand(vocab_size, width, scale=0.02),
        "positional_embedding": rand(77, width, scale=0.01),
        "ln_final.weight": 1 + rand(width),
        "ln_final.bias": rand(width),
        "text_projection": rand(width, embed_dim),
        "logit_scale": torch.tensor(4.6),
        "visual.proj": rand(8, embed_dim),
    }
    for i in range(layers):
        block = f"transformer.resblocks.{i}."
        tower.update(
            {
                block + "ln_1.weight": 1 + rand(width),
                block + "ln_1.bias": rand(width),
                block + "attn.in_proj_weight": rand(3 * width, width, scale=0.2),
                block + "attn.in_proj_bias": rand(3 * width),
                block + "attn.out_proj.weight": rand(width, width, scale=0.2),
                block + "attn.out_proj.bias": rand(width),
                block + "ln_2.weight": 1 + rand(width),
                block + "ln_2.bias": rand(width),
                block + "mlp.c_fc.weight": rand(4 * width, width, scale=0.2),
                block + "mlp.c_fc.bias": rand(4 * width),
                block + "mlp.c_proj.weight": rand(width, 4 * width, scale=0.1),
                block + "mlp.c_proj.bias": rand(width),
            }
        )
    return tower


def test_convert_then_load_in_fresh_process(tmp_path):
    sidecar, state_dict, _ = load_microdit_fixture()
    torch.save(state_dict, tmp_path / "dit.pt")  # the official checkpoints are pickled plain state dicts
    tokenizer = tiny_clip_tokenizer()
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    tiny_vae().save_pretrained(tmp_path / "vae")
    save_file(fake_openclip_text_tower(len(tokenizer)), tmp_path / "open_clip_model.safetensors")
    kwargs = sidecar["constructor"]["kwargs"]
    original_config = {k: kwargs[k] for k in ("head_dim", "multiple_of", "qkv_multipliers", "ffn_multipliers",
                                              "patch_mixer_mlp_ratio", "num_experts", "expert_capacity")}

    command = [
        sys.executable, str(REPO_ROOT / "scripts" / "convert_microdit_to_diffusers.py"),
        "--checkpoint_path", str(tmp_path / "dit.pt"),
        "--original_config", json.dumps(original_config),
        "--vae", str(tmp_path / "vae"),
        "--text_encoder_path", str(tmp_path / "open_clip_model.safetensors"),
        "--num_attention_heads", "4",
        "--tokenizer", str(tmp_path / "tokenizer"),
        "--output_path", str(tmp_path / "pipeline"),
    ]
    subprocess.run(command, check=True, env={"HF_HUB_OFFLINE": "1", "PATH": ""})
    folder = tmp_path / "pipeline"
    assert not list(folder.rglob("*.bin")) and list(folder.rglob("*.safetensors"))

    pipe = MicroDiTPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    ids = pipe.tokenizer("a cat", padding="max_length", truncation=True).input_ids
    assert len(ids) == 77 and ids[-1] == 0  # padded like open_clip
    assert 0 not in pipe.tokenizer.added_tokens_decoder  # "!" in a prompt stays a BPE token, not padding
    expected = pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images

    script = f"""
import numpy as np, torch
import diffusers_microdit
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained({str(folder)!r})
assert isinstance(pipe, diffusers_microdit.MicroDiTPipeline)
pipe.set_progress_bar_config(disable=True)
np.save({str(tmp_path / 'images.npy')!r}, pipe("a red circle", num_inference_steps=2,
        generator=torch.Generator().manual_seed(0), output_type="np").images)
"""
    subprocess.run([sys.executable, "-c", script], check=True, env={"HF_HUB_OFFLINE": "1", "PATH": ""})
    reloaded = np.load(tmp_path / "images.npy")
    assert (np.round(reloaded * 255) == np.round(expected * 255)).all()
    np.testing.assert_allclose(reloaded, expected, atol=1e-5)
