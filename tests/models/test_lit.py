"""LiT (linear-attention PixArt-Σ): the linear attention against its quadratic formula, linear memory, weight
inheritance from PixArt-Σ, saving/loading, the pipeline, and argument errors."""

import json
import logging

import pytest
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline, PixArtTransformer2DModel
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention_processor import AttnProcessor2_0
from helpers import (
    GENERATE,
    TINY_PIXART_CONFIG,
    generate,
    randomize_,
    tiny_pixart_components,
    tiny_pixart_inputs,
)
from helpers import run_transformer as run
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import diffusers_microdit  # noqa: F401  (registers the package's pipelines with diffusers)
from diffusers_microdit.models.transformer_lit import (
    LiTLinearAttention,
    LiTLinearAttnProcessor,
    LiTTransformer2DModel,
    linear_attention,
)
from diffusers_microdit.models.transformer_pixart_kv import PixArtSigmaKVTransformer2DModel
from diffusers_microdit.pipelines.pipeline_lit import LiTPipeline

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: one intra-op thread
TINY_CONFIG = {**TINY_PIXART_CONFIG, "num_layers": 2}
SELF_ATTENTION_PARAMETERS = ("to_q", "to_k", "to_v", "to_out.0", "value_conv")


def tiny_pixart(seed: int = 0, **overrides) -> PixArtTransformer2DModel:
    """diffusers' PixArt-Σ transformer with every parameter re-drawn (nothing zero-initialised)."""
    return randomize_(PixArtTransformer2DModel(**{**TINY_CONFIG, **overrides}), seed=seed).eval()


def tiny_lit(seed: int = 0, **lit_options) -> LiTTransformer2DModel:
    return randomize_(LiTTransformer2DModel.from_pixart(tiny_pixart(seed), **lit_options), seed=seed + 1)


def tiny_inputs(height: int = 6, width: int = 10, seed: int = 1) -> dict:
    return tiny_pixart_inputs(height, width, seed)


def assert_nothing_on_meta(model):
    on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    assert not on_meta, on_meta


def expected_not_inherited(num_layers: int) -> list[str]:
    return sorted(
        f"transformer_blocks.{i}.attn1.{name}.{kind}"
        for i in range(num_layers)
        for name in SELF_ATTENTION_PARAMETERS
        for kind in ("weight", "bias")
    )


# ---------------------------------------------------------------------------------------------- linear attention


def quadratic_lit_attention(attn: LiTLinearAttention, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """LiT self-attention evaluated literally: the N x N matrix φ(Q)φ(K)ᵀ per head, its row sums as normaliser,
    and the depthwise conv as a sum of 25 shifted copies of the value grid."""
    batch, tokens, dim = x.shape
    heads, eps = attn.heads, attn.linear_attention_eps
    q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (attn.to_q(x), attn.to_k(x), attn.to_v(x)))
    scores = F.relu(q) @ F.relu(k).transpose(-2, -1)  # (B, heads, N, N)
    out = (scores @ v) / (scores.sum(dim=-1, keepdim=True) + tokens * eps)
    out = out.transpose(1, 2).reshape(batch, tokens, dim)

    conv = attn.value_conv
    repeat = heads if conv.channels == "head_dim" else 1  # shared filters: the same ones for every head
    weight, bias = conv.weight[:, 0].repeat(repeat, 1, 1), conv.bias.repeat(repeat)  # (C, 5, 5), (C,)
    grid = attn.to_v(x).reshape(batch, height, width, dim)  # tokens are row-major: index h * width + w
    padded = F.pad(grid, (0, 0, 2, 2, 2, 2))
    local = bias.expand(batch, height, width, dim).clone()
    for a in range(5):
        for b in range(5):
            local = local + padded[:, a : a + height, b : b + width] * weight[:, a, b]
    return attn.to_out[0](out + local.reshape(batch, tokens, dim))


@pytest.mark.parametrize("channels", ["head_dim", "inner_dim"])
@pytest.mark.parametrize("height, width", [(3, 7), (6, 4), (5, 5), (1, 9)])
def test_linear_attention_equals_quadratic_formula(channels, height, width):
    torch.manual_seed(0)
    attn = LiTLinearAttention(16, heads=2, eps=1e-3, value_conv_channels=channels)
    randomize_(attn, scale=0.5).double()
    x = torch.randn(2, height * width, 16, dtype=torch.float64)
    with torch.no_grad():
        actual = attn(x, height=height, width=width)
        expected = quadratic_lit_attention(attn, x, height, width)
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)


def test_linear_attention_is_safe_without_positive_overlap():
    """A query with no positive feature gets a zero attention output (ε keeps the normaliser non-zero)."""
    query = -torch.ones(1, 6, 8)
    key, value = torch.rand(1, 6, 8), torch.rand(1, 6, 8)
    out = linear_attention(query, key, value, heads=2, eps=1e-6)
    assert torch.equal(out, torch.zeros_like(out))
    half = linear_attention(query.half(), key.half(), value.half(), heads=2)
    assert half.dtype == torch.float16 and torch.isfinite(half).all()


class TensorShapeRecorder(TorchDispatchMode):
    """Records the shape of every tensor an ATen operator returns."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.shapes += [tuple(t.shape) for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        return out


def token_by_token_shapes(shapes, tokens):
    return [shape for shape in shapes if sum(size >= tokens for size in shape) >= 2]


def test_no_token_by_token_tensor_is_ever_built():
    height, width = 12, 10  # 120 tokens, far more than any channel count
    tokens = height * width
    torch.manual_seed(0)
    attn = LiTLinearAttention(16, heads=2)
    x = torch.randn(1, tokens, 16)

    with torch.no_grad(), TensorShapeRecorder() as layer:
        attn(x, height=height, width=width)
    assert layer.shapes and not token_by_token_shapes(layer.shapes, tokens)
    assert max(torch.Size(shape).numel() for shape in layer.shapes) < tokens * tokens

    # The recorder does see an N x N matrix when one is built.
    with torch.no_grad(), TensorShapeRecorder() as quadratic:
        quadratic_lit_attention(attn, x, height, width)
    assert (1, 2, tokens, tokens) in token_by_token_shapes(quadratic.shapes, tokens)

    # Whole model, non-square latent of 24 x 20 (12 x 10 tokens): nothing quadratic either.
    model = tiny_lit()
    inputs = tiny_inputs(height=2 * height, width=2 * width)
    with TensorShapeRecorder() as full:
        run(model, inputs)
    assert full.shapes and not token_by_token_shapes(full.shapes, tokens)


# ---------------------------------------------------------------------------------------------- from_pixart


def test_from_pixart_inherits_everything_but_self_attention(caplog):
    teacher = tiny_pixart(num_layers=3)
    with caplog.at_level(logging.INFO, logger="diffusers_microdit.models.transformer_lit"):
        student, info = LiTTransformer2DModel.from_pixart(teacher, output_loading_info=True)

    assert info["not_inherited_keys"] == expected_not_inherited(3)
    assert all(key in caplog.text for key in info["not_inherited_keys"])
    teacher_state, student_state = teacher.state_dict(), student.state_dict()
    assert info["inherited_keys"] == sorted(key for key in teacher_state if ".attn1." not in key)
    assert sorted(info["inherited_keys"] + info["not_inherited_keys"]) == sorted(student_state)
    for key in info["inherited_keys"]:
        assert torch.equal(student_state[key], teacher_state[key]), key

    # Fresh projections: PixArt's xavier init, zero biases; same shapes as the teacher's.
    for i in range(3):
        for name in ("to_q", "to_k", "to_v", "to_out.0"):
            prefix = f"transformer_blocks.{i}.attn1.{name}"
            weight = student_state[f"{prefix}.weight"]
            assert weight.shape == teacher_state[f"{prefix}.weight"].shape
            assert not torch.equal(weight, teacher_state[f"{prefix}.weight"])
            assert not student_state[f"{prefix}.bias"].any()

    block = student.transformer_blocks[0]
    assert isinstance(block.attn1, LiTLinearAttention) and block.attn1.heads == 2
    assert block.attn2.heads == TINY_CONFIG["num_attention_heads"]  # softmax cross-attention unchanged
    assert isinstance(block.attn2.processor, AttnProcessor2_0)
    student_config, teacher_config = (
        {k: v for k, v in model.config.items() if not k.startswith("_")} for model in (student, teacher)
    )
    lit_defaults = dict(
        linear_attention_heads=2, linear_attention_eps=1e-6, value_conv_channels="head_dim", value_conv_init="default"
    )
    assert {key: student_config.pop(key) for key in lit_defaults} == lit_defaults
    assert student_config == teacher_config
    assert isinstance(student, PeftAdapterMixin) and not student.training


def test_from_pixart_options_dtype_and_errors():
    teacher = tiny_pixart().double()
    student = LiTTransformer2DModel.from_pixart(
        teacher, num_attention_heads=4, value_conv_channels="inner_dim", value_conv_init="zeros"
    )
    assert student.dtype == torch.float64
    assert student.transformer_blocks[1].attn1.heads == 4
    conv = student.transformer_blocks[1].attn1.value_conv
    assert conv.weight.shape == (16, 1, 5, 5) and not conv.weight.any() and not conv.bias.any()
    assert torch.equal(student.proj_out.weight, teacher.proj_out.weight)
    shared = LiTTransformer2DModel.from_pixart(tiny_pixart()).transformer_blocks[0].attn1.value_conv
    assert shared.weight.shape == (8, 1, 5, 5)  # head_dim filters, shared by both heads

    with pytest.raises(TypeError, match="PixArtTransformer2DModel"):
        LiTTransformer2DModel.from_pixart(student)

    # A KV-compressed teacher: its compression modules belong to the replaced self-attention and are dropped.
    compressed = PixArtSigmaKVTransformer2DModel(**TINY_CONFIG, kv_compress_layers=[1])
    _, info = LiTTransformer2DModel.from_pixart(compressed, output_loading_info=True)
    assert info["not_inherited_keys"] == expected_not_inherited(2)
    assert not any("kv_compress" in key for key in info["inherited_keys"])


# ---------------------------------------------------------------------------------------------- model behaviour


def test_any_grid_divisible_by_patch_size_and_heads_matter():
    model = tiny_lit()
    for height, width in [(2, 2), (6, 10), (14, 4)]:
        out = run(model, tiny_inputs(height, width))
        assert out.shape == (2, 8, height, width) and torch.isfinite(out).all()

    # With one filter per channel no parameter shape depends on the head count; only the result does.
    model = tiny_lit(value_conv_channels="inner_dim")
    one_head = LiTTransformer2DModel.from_config({**model.config, "linear_attention_heads": 1})
    one_head.load_state_dict(model.state_dict())
    inputs = tiny_inputs()
    assert not torch.allclose(run(one_head, inputs), run(model, inputs))


def test_save_load_round_trip(tmp_path):
    model = tiny_lit(value_conv_channels="inner_dim", num_attention_heads=4)
    inputs = tiny_inputs()
    model.save_pretrained(tmp_path)
    for low_cpu_mem_usage in (True, False):
        reloaded, info = LiTTransformer2DModel.from_pretrained(
            tmp_path, low_cpu_mem_usage=low_cpu_mem_usage, output_loading_info=True
        )
        assert not info["missing_keys"] and not info["unexpected_keys"]
        assert_nothing_on_meta(reloaded)
        assert reloaded.config.value_conv_channels == "inner_dim" and reloaded.config.linear_attention_heads == 4
        assert torch.equal(run(reloaded, inputs), run(model, inputs))


def test_pixart_folder_is_not_silently_loaded_as_lit(tmp_path):
    tiny_pixart().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="from_pixart"):
        LiTTransformer2DModel.from_pretrained(tmp_path)


def test_processors_are_swappable_but_must_take_the_grid():
    model = tiny_lit()
    inputs = tiny_inputs()
    expected = run(model, inputs)

    model.set_attn_processor(AttnProcessor2_0())  # a softmax processor would silently drop the LiT layer
    with pytest.raises(RuntimeError, match="LiTLinearAttnProcessor"):
        run(model, inputs)
    model.set_default_attn_processor()
    torch.testing.assert_close(run(model, inputs), expected, rtol=1e-5, atol=1e-5)

    processors = model.attn_processors
    assert isinstance(processors["transformer_blocks.0.attn1.processor"], LiTLinearAttnProcessor)
    model.fuse_qkv_projections()  # fused q/k/v keep the linear attention (see test_model_contracts.py)
    assert isinstance(model.attn_processors["transformer_blocks.0.attn1.processor"], LiTLinearAttnProcessor)
    torch.testing.assert_close(run(model, inputs), expected, rtol=1e-5, atol=1e-5)


def test_gradient_checkpointing_gives_same_gradients():
    model = tiny_lit().train()
    inputs = tiny_inputs()

    def gradients():
        model.zero_grad()
        model(**inputs).sample.square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = gradients()
    model.enable_gradient_checkpointing()
    checkpointed = gradients()
    assert plain.keys() == checkpointed.keys() and any(".value_conv." in n for n in plain)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6)


def test_model_argument_errors():
    with pytest.raises(ValueError, match="divisor of the width 16"):
        LiTTransformer2DModel(**TINY_CONFIG, linear_attention_heads=3)
    with pytest.raises(ValueError, match="value_conv_channels"):
        LiTTransformer2DModel(**TINY_CONFIG, value_conv_channels="per_head")
    with pytest.raises(ValueError, match="value_conv_init"):
        LiTTransformer2DModel(**TINY_CONFIG, value_conv_init="xavier")
    with pytest.raises(ValueError, match="linear_attention_eps"):
        LiTTransformer2DModel(**TINY_CONFIG, linear_attention_eps=0.0)

    model = tiny_lit()
    with pytest.raises(ValueError, match="multiples of patch_size=2"):
        run(model, tiny_inputs(height=5, width=6))
    with pytest.raises(ValueError, match="no attention mask"):
        run(model, {**tiny_inputs(), "attention_mask": torch.ones(2, 15)})

    attn = model.transformer_blocks[0].attn1
    x = torch.randn(1, 12, 16)
    with pytest.raises(ValueError, match="height and width"):
        attn(x)
    with pytest.raises(ValueError, match="does not match the 12 tokens"):
        attn(x, height=3, width=5)


# ---------------------------------------------------------------------------------------------- pipeline


def tiny_lit_components() -> dict:
    """The tiny PixArt-Σ pipeline components of test_pixart_kv with a LiT transformer."""
    # sample_size 32 selects diffusers' 256-px aspect-ratio bins.
    teacher = tiny_pixart(sample_size=32, interpolation_scale=0.5)
    transformer = randomize_(LiTTransformer2DModel.from_pixart(teacher), seed=5)
    return {**tiny_pixart_components(), "transformer": transformer}


@pytest.fixture(scope="module")
def lit_pipeline():
    return LiTPipeline(**tiny_lit_components())


@pytest.fixture(scope="module")
def saved_lit_pipeline(lit_pipeline, tmp_path_factory):
    path = tmp_path_factory.mktemp("lit_pipeline")
    lit_pipeline.save_pretrained(path)
    return path


def test_pipeline_generates_non_square_images(lit_pipeline):
    grids = []
    conv = lit_pipeline.transformer.transformer_blocks[0].attn1.value_conv
    hook = conv.register_forward_hook(lambda m, args, out: grids.append(args[1:]))
    try:
        images = generate(lit_pipeline, height=32, width=80, use_resolution_binning=False)
        binned = generate(lit_pipeline, height=64, width=128)  # binned to 176x352 px, cropped back
    finally:
        hook.remove()
    assert images.shape == (1, 32, 80, 3) and binned.shape == (1, 64, 128, 3)
    assert ((images >= 0) & (images <= 1)).all()
    assert set(grids) == {(2, 5), (11, 22)}


def test_pipeline_save_and_reload(lit_pipeline, saved_lit_pipeline):
    index = json.loads((saved_lit_pipeline / "model_index.json").read_text())
    assert index["_class_name"] == "LiTPipeline"
    assert index["transformer"] == ["diffusers_microdit.models.transformer_lit", "LiTTransformer2DModel"]

    kwargs = dict(height=32, width=48, use_resolution_binning=False)
    expected = generate(lit_pipeline, **kwargs)
    for loader in (LiTPipeline, DiffusionPipeline):
        pipe = loader.from_pretrained(saved_lit_pipeline)
        assert type(pipe) is LiTPipeline and type(pipe.transformer) is LiTTransformer2DModel
        assert_nothing_on_meta(pipe.transformer)
        assert (generate(pipe, **kwargs) == expected).all()


def test_pipeline_argument_errors(lit_pipeline):
    components = lit_pipeline.components
    with pytest.raises(TypeError, match="from_pixart"):
        LiTPipeline(**{**components, "transformer": tiny_pixart(sample_size=32)})
    with pytest.raises(ValueError, match="multiples of 16"):
        generate(lit_pipeline, height=40, width=48, use_resolution_binning=False)
    with pytest.raises(ValueError, match="caption_channels=8"):
        lit_pipeline(
            prompt_embeds=torch.randn(1, 4, 12),
            prompt_attention_mask=torch.ones(1, 4),
            guidance_scale=1.0,
            **{**GENERATE, "clean_caption": False},
        )
    with pytest.raises(ValueError, match="Cannot forward both `prompt`"):
        lit_pipeline("a cat", prompt_embeds=torch.randn(1, 4, 8), prompt_attention_mask=torch.ones(1, 4))
