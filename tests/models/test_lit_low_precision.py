"""LiT's inference attention (`linear_attention_`): in place, in the inputs' dtype, without float32 copies of q/k/v.

Tolerances: the low-precision result is compared with float32 [`linear_attention`] of the same (already rounded)
inputs, so only the computation's own rounding counts: bfloat16 (8-bit mantissa) within 2e-2, float16 (11-bit)
within 2e-3, relative and absolute, for outputs of magnitude about 1. float32 within 1e-5 and float64 within 1e-12
of the reference: only the order of the float operations differs.
"""

import logging

import pytest
import torch
from helpers import TINY_PIXART_CONFIG, randomize_, tiny_pixart_inputs
from helpers import run_transformer as run
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from diffusers_microdit.models.transformer_lit import (
    SCRATCH_CHUNK_TOKENS,
    LiTLinearAttention,
    LiTTransformer2DModel,
    linear_attention,
    linear_attention_,
)

pytestmark = pytest.mark.usefixtures("single_thread")
TOLERANCE = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
}
LOGGER = "diffusers_microdit.models.transformer_lit"
FALLBACK_MESSAGE = "computed in float32"


def qkv(tokens: int, dim: int, dtype: torch.dtype, scale: float = 1.0, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [(scale * torch.randn(2, tokens, dim, generator=generator)).to(dtype) for _ in range(3)]


def in_place(query, key, value, heads=2, eps=1e-6) -> torch.Tensor:
    """`linear_attention_` on copies, so that the caller's inputs stay usable for the reference."""
    return linear_attention_(query.clone(), key.clone(), value.clone(), heads, eps)


def reference(query, key, value, heads=2, eps=1e-6) -> torch.Tensor:
    """float32 (or float64) `linear_attention` of the same rounded inputs."""
    dtype = torch.promote_types(query.dtype, torch.float32)
    return linear_attention(query.to(dtype), key.to(dtype), value.to(dtype), heads, eps)


class Float32Allocations(TorchDispatchMode):
    """Records the element count of every float32 tensor an ATen operator returns."""

    def __init__(self):
        super().__init__()
        self.numels = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.numels += [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.dtype == torch.float32]
        return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [7, 300, 1024])
def test_in_place_attention_matches_the_reference(dtype, tokens):
    query, key, value = qkv(tokens, 32, dtype)
    out = in_place(query, key, value)
    assert out.dtype == dtype and out.shape == query.shape
    torch.testing.assert_close(out.to(torch.float64), reference(query, key, value).double(), **TOLERANCE[dtype])


def test_output_overwrites_the_keys_and_query_becomes_its_features():
    query, key, value = qkv(20, 16, torch.float32)
    features = query.relu()
    expected = reference(query, key, value)
    out = linear_attention_(query, key, value, heads=2)
    assert out.data_ptr() == key.data_ptr()
    torch.testing.assert_close(query, features, rtol=0, atol=0)
    torch.testing.assert_close(out, expected, **TOLERANCE[torch.float32])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_makes_no_token_sized_float32_tensor(dtype):
    tokens, dim = 4 * SCRATCH_CHUNK_TOKENS, 64
    query, key, value = qkv(tokens, dim, dtype)
    with Float32Allocations() as recorded:
        linear_attention_(query, key, value, heads=2)
    # float32 scratch: one head's (head_dim x head_dim) summary and chunks of SCRATCH_CHUNK_TOKENS tokens.
    assert recorded.numels and max(recorded.numels) <= SCRATCH_CHUNK_TOKENS * dim // 2


def test_float16_is_safe_where_the_sum_form_overflows(caplog):
    """16384 tokens with keys and values about 4: the plain sums Σ_j φ(k_j) v_jᵀ reach ~10^5, beyond float16's
    65504, but the normalised summaries stay bounded, so float16 is used and matches float32."""
    query, key, value = (t.abs() + 3 for t in qkv(16384, 16, torch.float16))
    head_key, head_value = key[0, :, :8].float(), value[0, :, :8].float()
    assert (head_key.T @ head_value).max() > torch.finfo(torch.float16).max
    with caplog.at_level(logging.INFO, logger=LOGGER):
        out = in_place(query, key, value)
    assert FALLBACK_MESSAGE not in caplog.text and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), reference(query, key, value), **TOLERANCE[torch.float16])


def test_float16_falls_back_to_float32_when_products_could_overflow(caplog):
    """Activations of a few hundred: a query row sum (~16 x 300) times summary entries (~300) exceeds half the
    float16 maximum, so that head is computed in float32; bfloat16 (float32's range) never falls back."""
    query, key, value = (t.abs() + 300 for t in qkv(64, 32, torch.float16, seed=3))
    with caplog.at_level(logging.INFO, logger=LOGGER):
        out = in_place(query, key, value)
    assert FALLBACK_MESSAGE in caplog.text and torch.isfinite(out).all()
    expected = reference(query, key, value)
    torch.testing.assert_close(out.float(), expected, rtol=2e-3, atol=2e-3 * float(expected.abs().max()))

    caplog.clear()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        out = in_place(query.bfloat16(), key.bfloat16(), value.bfloat16())
    assert FALLBACK_MESSAGE not in caplog.text and torch.isfinite(out).all()


def test_no_positive_overlap_gives_zero_in_every_dtype():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        query = -torch.ones(1, 6, 8, dtype=dtype)
        key, value = torch.rand(1, 6, 8).to(dtype), torch.rand(1, 6, 8).to(dtype)
        out = in_place(query, key, value)
        assert torch.equal(out, torch.zeros_like(out)), dtype


@pytest.mark.parametrize("channels", ["head_dim", "inner_dim"])
def test_layer_inference_path_matches_the_training_path(channels):
    """Without autograd the processor runs `linear_attention_`; with it, the differentiable reference."""
    torch.manual_seed(0)
    attn = randomize_(LiTLinearAttention(16, heads=2, value_conv_channels=channels), scale=0.5).eval()
    x = torch.randn(2, 6 * 5, 16)
    with torch.no_grad():
        inference = attn(x, height=6, width=5)
    training = attn(x.requires_grad_(), height=6, width=5)
    assert training.requires_grad
    torch.testing.assert_close(inference, training.detach(), **TOLERANCE[torch.float32])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_whole_model_in_low_precision_matches_float32(dtype):
    """A tiny LiT transformer cast to bfloat16/float16 against float32; the tolerance is looser than the
    attention's alone since every layer (projections, MLP, adaLN) rounds."""
    model = randomize_(LiTTransformer2DModel(**{**TINY_PIXART_CONFIG, "num_layers": 2}), seed=2).eval()
    inputs = tiny_pixart_inputs(height=16, width=12)
    expected = run(model, inputs)
    low = {key: value.to(dtype) if value.is_floating_point() else value for key, value in inputs.items()
           if isinstance(value, torch.Tensor)}
    actual = run(model.to(dtype), {**inputs, **low})
    assert actual.dtype == dtype
    scale = float(expected.abs().max())
    atol = (5e-2 if dtype == torch.bfloat16 else 1e-2) * scale
    torch.testing.assert_close(actual.float(), expected, rtol=0, atol=atol)
