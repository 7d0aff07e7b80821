"""Converting original MicroDiT checkpoints whatever their storage: half-precision `pos_embed` tables (the scale is read
off them within the storage precision) and `use_bias=True` weights (dense SwiGLU, attention and mixer-map biases)."""

import json
import re

import pytest
import torch
import torch.nn.functional as F
from helpers import MICRODIT_FIXTURES, load_microdit_fixture

from diffusers_microdit import MicroDiTTransformer2DModel
from diffusers_microdit.conversion.microdit import convert_microdit_checkpoint
from diffusers_microdit.models.transformer_microdit import microdit_2d_sincos_pos_embed

pytestmark = pytest.mark.usefixtures("single_thread")

# Linears whose bias the original's single `use_bias` switch adds (the dense `mlp.w*` have 2-D weights; the MoE
# `mlp.w1`/`mlp.w2` are bare 3-D parameters and never get one).
_USE_BIAS_WEIGHT = re.compile(r".*(attn\.qkv|attn\.proj|cross_attn\.\w+|mlp\.w[123]|patch_mixer_map_\w+\.1)\.weight$")


@pytest.fixture(scope="module")
def fixture():
    sidecar, state_dict, io = load_microdit_fixture()
    kwargs = {k: v for k, v in sidecar["constructor"]["kwargs"].items() if k not in ("pos_interp_scale", "use_bias")}
    return sidecar, state_dict, io, kwargs


def with_pos_embed(state_dict: dict, scale: float, dtype: torch.dtype) -> dict:
    """The fixture's weights with the (8 x 8 token) position table of `scale`, stored in `dtype`."""
    return dict(state_dict, pos_embed=microdit_2d_sincos_pos_embed(48, 8, 8, scale).unsqueeze(0).to(dtype))


def with_biases(state_dict: dict, seed: int | None) -> dict:
    """The fixture's weights as a `use_bias=True` DiT would store them: random biases, or zeros if `seed` is None."""
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    biases = {
        key.removesuffix("weight") + "bias": torch.zeros(value.shape[0])
        if generator is None
        else torch.randn(value.shape[0], generator=generator)
        for key, value in state_dict.items()
        if _USE_BIAS_WEIGHT.match(key) and value.ndim == 2
    }
    return {**state_dict, **biases}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale", [1.0, 2.0, 0.5])
def test_half_precision_pos_embed_gives_the_exact_scale(fixture, dtype, scale):
    _, state_dict, _, kwargs = fixture
    stored = with_pos_embed(state_dict, scale, dtype)
    assert MicroDiTTransformer2DModel.from_original(stored, kwargs).config.pos_interp_scale == scale
    explicit = MicroDiTTransformer2DModel.from_original(stored, {**kwargs, "pos_interp_scale": scale})
    assert explicit.config.pos_interp_scale == scale


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_wrong_explicit_scale_is_refused(fixture, dtype):
    _, state_dict, _, kwargs = fixture
    stored = with_pos_embed(state_dict, 2.0, dtype)
    with pytest.raises(ValueError, match=r"pos_interp_scale=1.0 by .*original_config\['pos_interp_scale'\]"):
        MicroDiTTransformer2DModel.from_original(stored, {**kwargs, "pos_interp_scale": 1.0})
    # A nearby scale is as wrong: the half-precision tolerance does not blur neighbouring candidates together.
    with pytest.raises(ValueError, match="pos_interp_scale=1.875"):
        MicroDiTTransformer2DModel.from_original(stored, {**kwargs, "pos_interp_scale": 1.875})


def test_bf16_values_saved_in_float32_get_the_bf16_tolerance(fixture):
    """A buffer cast to bf16 for training and saved back in float32 carries bf16 precision, not float32's."""
    _, state_dict, _, kwargs = fixture
    stored = dict(state_dict, pos_embed=with_pos_embed(state_dict, 2.0, torch.bfloat16)["pos_embed"].float())
    assert MicroDiTTransformer2DModel.from_original(stored, kwargs).config.pos_interp_scale == 2.0


def test_unreadable_scale_asks_for_an_explicit_one(fixture):
    """A scale off the candidate grid is not guessed; stated explicitly, it is checked and accepted."""
    _, state_dict, _, kwargs = fixture
    stored = with_pos_embed(state_dict, 1.3, torch.bfloat16)
    with pytest.raises(ValueError, match=r"Cannot read pos_interp_scale.*original_config\['pos_interp_scale'\]"):
        MicroDiTTransformer2DModel.from_original(stored, kwargs)
    explicit = MicroDiTTransformer2DModel.from_original(stored, {**kwargs, "pos_interp_scale": 1.3})
    assert explicit.config.pos_interp_scale == 1.3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_official_512px_layout_with_half_precision_pos_embed(dtype):
    """All 478 keys of the released 512-px XL files (shapes only) plus a real half-precision table: scale 2."""
    arch = json.loads((MICRODIT_FIXTURES / "microdit_reference_architectures.json").read_text())
    arch = arch["MicroDiT_XL_2@512px_4ch (dit_4_channel_*.pt)"]
    original = {k: torch.empty(shape, device="meta") for k, shape in arch["state_dict"].items()}
    original["pos_embed"] = microdit_2d_sincos_pos_embed(1024, 32, 32, 2.0).unsqueeze(0).to(dtype)
    config, converted = convert_microdit_checkpoint(original)
    assert config["pos_interp_scale"] == 2.0 and config["sample_size"] == 64
    assert len(converted) > 0 and "pos_embed" not in converted


def test_zero_biases_load_strictly_and_reproduce_the_original(fixture):
    """`use_bias` is read off the weights; with all-zero biases the model must give the original's outputs."""
    sidecar, state_dict, io, kwargs = fixture
    model = MicroDiTTransformer2DModel.from_original(with_biases(state_dict, seed=None), kwargs)
    assert model.config.attention_bias
    assert model.transformer_blocks[0].ff.down_proj.bias is not None
    with torch.no_grad():
        out = model(io["inputs.x"], io["inputs.t"], io["inputs.y"]).sample
    tol = sidecar["tolerances"]["dit_forward"]["out.sample"]
    torch.testing.assert_close(out, io["out.sample"], atol=tol["atol"], rtol=tol["rtol"])


def test_biases_land_in_their_parameters(fixture):
    _, state_dict, _, kwargs = fixture
    original = with_biases(state_dict, seed=0)
    params = dict(MicroDiTTransformer2DModel.from_original(original, kwargs).named_parameters())

    def joined(*names):
        return torch.cat([params[name] for name in names])

    # The dense SwiGLU blocks (block 1 is MoE in both stacks).
    blocks = (
        ("patch_mixer.0", "patch_mixer_blocks.0"), ("blocks.0", "transformer_blocks.0"), ("blocks.3", "transformer_blocks.3")
    )
    for block, ours in blocks:
        expected = {
            "mlp.w1": params[f"{ours}.ff.gate_proj.bias"],
            "mlp.w2": params[f"{ours}.ff.up_proj.bias"],
            "mlp.w3": params[f"{ours}.ff.down_proj.bias"],
            "attn.qkv": joined(*(f"{ours}.attn1.to_{p}.bias" for p in "qkv")),
            "attn.proj": params[f"{ours}.attn1.to_out.0.bias"],
            "cross_attn.q_linear": params[f"{ours}.attn2.to_q.bias"],
            "cross_attn.kv_linear": joined(f"{ours}.attn2.to_k.bias", f"{ours}.attn2.to_v.bias"),
            "cross_attn.proj": params[f"{ours}.attn2.to_out.0.bias"],
        }
        for name, value in expected.items():
            assert torch.equal(value, original[f"{block}.{name}.bias"]), f"{block}.{name}"
    refiner = {
        "mlp.w1": params["caption_refiner.ff.gate_proj.bias"],
        "mlp.w2": params["caption_refiner.ff.up_proj.bias"],
        "mlp.w3": params["caption_refiner.ff.down_proj.bias"],
        "attn.qkv": joined(*(f"caption_refiner.attn.to_{p}.bias" for p in "qkv")),
        "attn.proj": params["caption_refiner.attn.to_out.0.bias"],
    }
    for name, value in refiner.items():
        assert torch.equal(value, original[f"y_emb_preprocess.{name}.bias"]), name
    for name, ours in (("xin", "in"), ("xout", "out"), ("y", "context")):
        assert torch.equal(params[f"patch_mixer_proj_{ours}.linear.bias"], original[f"patch_mixer_map_{name}.1.bias"])


def test_dense_ffn_with_biases_computes_the_original_swiglu(fixture):
    """`w3(silu(w1 x + b1) * (w2 x + b2)) + b3` with the original tensors, against the converted block's FFN."""
    _, state_dict, _, kwargs = fixture
    original = with_biases(state_dict, seed=1)
    model = MicroDiTTransformer2DModel.from_original(original, kwargs)
    x = torch.randn(2, 5, 48, generator=torch.Generator().manual_seed(2))

    def linear(name, inputs):
        return F.linear(inputs, original[f"blocks.2.mlp.{name}.weight"], original[f"blocks.2.mlp.{name}.bias"])

    expected = linear("w3", F.silu(linear("w1", x)) * linear("w2", x))
    with torch.no_grad():
        torch.testing.assert_close(model.transformer_blocks[2].ff(x), expected)


def test_checkpoint_without_experts_is_all_dense(fixture):
    """No expert weights at all (an original built with experts_every_n beyond its depth): num_experts=0."""
    _, state_dict, _, kwargs = fixture
    kwargs = {k: v for k, v in kwargs.items() if k not in ("num_experts", "expert_capacity", "experts_every_n")}
    dense_config, _ = convert_microdit_checkpoint(state_dict, {**kwargs, "num_experts": 0, "use_bias": True})
    with torch.device("meta"):
        dense_shapes = MicroDiTTransformer2DModel(**dense_config).state_dict()
    original = {k: v for k, v in with_biases(state_dict, seed=3).items() if not re.match(r".*\.1\.mlp\.", k)}
    for ours, block in (("patch_mixer_blocks.1", "patch_mixer.1"), ("transformer_blocks.1", "blocks.1")):
        for name, proj in (("w1", "gate_proj"), ("w2", "up_proj"), ("w3", "down_proj")):
            for param in ("weight", "bias"):
                original[f"{block}.mlp.{name}.{param}"] = torch.randn(dense_shapes[f"{ours}.ff.{proj}.{param}"].shape)
    model = MicroDiTTransformer2DModel.from_original(original, kwargs)
    assert model.config.num_experts == 0 and model.config.attention_bias
    assert torch.equal(model.transformer_blocks[1].ff.down_proj.bias, original["blocks.1.mlp.w3.bias"])


def test_table_of_another_grid_is_refused(fixture):
    _, state_dict, _, kwargs = fixture
    with pytest.raises(ValueError, match=r"64 tokens, but input_size=32 means a 16x16 grid"):
        MicroDiTTransformer2DModel.from_original(state_dict, {**kwargs, "input_size": 32})
