# Copyright 2026 The diffusers-microdit authors. Apache-2.0.
"""The layers of [`MicroDiTTransformer2DModel`]: QK-norm attention, SwiGLU and expert-choice MoE feed-forwards,
caption/timestep embeddings and projections, the adaLN block, and the original's per-layer initialisation."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.models.attention import AttentionModuleMixin
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import Timesteps
from torch import nn


def attention_inner_dim(dim: int, head_dim: int, qkv_ratio: float) -> int:
    """Layer-wise-scaled self-attention width: `dim * qkv_ratio` rounded up to a multiple of two heads."""
    if qkv_ratio == 1:
        return dim
    return 2 * head_dim * math.ceil(int(dim * qkv_ratio) / (2 * head_dim))


def swiglu_hidden_dim(hidden_dim: int, multiple_of: int) -> int:
    """SwiGLU width: two thirds of the nominal hidden size, rounded up to `multiple_of` (as in Llama)."""
    return multiple_of * math.ceil(int(2 * hidden_dim / 3) / multiple_of)


class MicroDiTAttnProcessor:
    """Attention with MicroDiT's QK-norm: a non-affine LayerNorm over the full query/key vector (all heads jointly)
    before the head split, then scaled dot-product attention through diffusers' backend dispatcher (SDPA by
    default, so `set_attention_backend` works).

    Reads fused projections when the module has them (`fuse_qkv_projections`): `to_qkv` for self-attention, `to_kv`
    for cross-attention. The QK-norm runs after the split, on the same full-width vectors, so fusing changes nothing.
    `attention_mask` is a boolean (B, 1, 1, L) keep-mask over the keys (the caption's padding), or `None`.
    """

    _attention_backend = None
    _parallel_config = None

    def __call__(
        self,
        attn: MicroDiTAttention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        fused = attn.fused_projections
        if fused and encoder_hidden_states is None and hasattr(attn, "to_qkv"):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query = attn.to_q(hidden_states)
            if fused and hasattr(attn, "to_kv"):
                key, value = attn.to_kv(context).chunk(2, dim=-1)
            else:
                key, value = attn.to_k(context), attn.to_v(context)
        query = attn.norm_q(query).unflatten(-1, (attn.heads, -1))
        key = attn.norm_k(key).unflatten(-1, (attn.heads, -1))
        value = value.unflatten(-1, (attn.heads, -1))
        out = dispatch_attention_fn(
            query, key, value, attn_mask=attention_mask, backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )
        return attn.to_out[0](out.flatten(2, 3).to(query.dtype))


class MicroDiTAttention(nn.Module, AttentionModuleMixin):
    """Multi-head attention with across-heads QK LayerNorm; self-attention when no context is passed.

    `is_cross_attention` marks modules that attend to a separate context (the caption), so diffusers'
    `fuse_projections` fuses their k/v into `to_kv` and leaves `to_q` alone (q/k/v into `to_qkv` otherwise).
    """

    _default_processor_cls = MicroDiTAttnProcessor
    _available_processors = [MicroDiTAttnProcessor]
    _supports_qkv_fusion = True

    def __init__(
        self,
        query_dim: int,
        inner_dim: int,
        heads: int,
        bias: bool = False,
        eps: float = 1e-6,
        is_cross_attention: bool = False,
    ):
        super().__init__()
        if inner_dim % heads:
            raise ValueError(f"Attention width {inner_dim} is not divisible by {heads} heads.")
        self.heads = heads
        # Read by `AttentionModuleMixin.fuse_projections`.
        self.is_cross_attention = is_cross_attention
        self.use_bias = bias
        self.to_q = nn.Linear(query_dim, inner_dim, bias=bias)
        self.to_k = nn.Linear(query_dim, inner_dim, bias=bias)
        self.to_v = nn.Linear(query_dim, inner_dim, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner_dim, query_dim, bias=bias)])
        self.norm_q = nn.LayerNorm(inner_dim, eps=eps, elementwise_affine=False, bias=False)
        self.norm_k = nn.LayerNorm(inner_dim, eps=eps, elementwise_affine=False, bias=False)
        self.set_processor(self._default_processor_cls())

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.processor(self, hidden_states, encoder_hidden_states, attention_mask=attention_mask)


class MicroDiTSwiGLU(nn.Module):
    """Dense SwiGLU feed-forward: `down_proj(silu(gate_proj(x)) * up_proj(x))`."""

    def __init__(self, dim: int, hidden_dim: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=bias)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=bias)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MicroDiTExpertChoiceMoE(nn.Module):
    """Expert-choice mixture-of-experts feed-forward (exact-GELU experts, no biases, no auxiliary loss).

    Each sample routes on its own: the router's softmax over experts scores every token, and each expert takes its
    `int(capacity * T / num_experts)` best tokens (T = current sequence length, so masking changes the capacity).
    A token picked by several experts gets the gate-weighted sum of their outputs; a token picked by none gets 0.
    Expert weights are plain parameters in (in, out) layout, `w_in[e]` (dim, hidden) and `w_out[e]` (hidden, dim),
    so peft's LoRA (which wraps `nn.Linear`) does not adapt them.
    """

    def __init__(self, dim: int, hidden_dim: int, num_experts: int, capacity: float):
        super().__init__()
        self.num_experts = num_experts
        self.capacity = capacity
        self.router = nn.Linear(dim, num_experts, bias=False)
        self.w_in = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.w_out = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        k = int(self.capacity * tokens / self.num_experts)
        # Routing in float32 keeps the expert choice stable under bf16/fp16 autocast.
        probs = self.router(x).float().softmax(dim=-1)
        gates, token_ids = torch.topk(probs.transpose(1, 2), k, dim=-1)  # (B, E, k)
        # Gather the chosen tokens instead of the original's dense one-hot matmul: O(E*k*d) instead of O(E*k*T*d).
        flat_ids = token_ids.reshape(batch, -1, 1).expand(-1, -1, dim)
        chosen = torch.gather(x, 1, flat_ids).view(batch, self.num_experts, k, dim)
        hidden = F.gelu(torch.einsum("bekd,edh->bekh", chosen, self.w_in.to(x.dtype)))
        expert_out = torch.einsum("bekh,ehd->bekd", hidden, self.w_out.to(x.dtype))
        expert_out = expert_out * gates.to(x.dtype).unsqueeze(-1)
        return torch.zeros_like(x).scatter_add_(1, flat_ids, expert_out.reshape(batch, -1, dim))


class MicroDiTProjection(nn.Module):
    """Linear -> GELU(tanh) -> weight-only LayerNorm -> Linear (caption and pooled-caption projections)."""

    def __init__(self, in_dim: int, dim: int, eps: float):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.norm = nn.LayerNorm(dim, eps=eps, bias=False)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.norm(F.gelu(self.linear_1(x), approximate="tanh")))


class MicroDiTTimestepEmbedding(nn.Module):
    """512 cos-first sinusoidal frequencies of the EDM noise level, then Linear -> GELU(tanh) -> Linear."""

    def __init__(self, dim: int, num_frequencies: int = 512):
        super().__init__()
        self.time_proj = Timesteps(num_frequencies, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.linear_1 = nn.Linear(num_frequencies, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, timestep: torch.Tensor, hidden_dtype: torch.dtype) -> torch.Tensor:
        # The compute dtype comes from the hidden states, never from the weights: under layerwise casting the
        # weights are stored in a storage dtype (e.g. float8) and only cast for the duration of each linear.
        freqs = self.time_proj(timestep.float()).to(hidden_dtype)
        return self.linear_2(F.gelu(self.linear_1(freqs), approximate="tanh"))


class MicroDiTNormProjection(nn.Module):
    """Weight-only LayerNorm then Linear: moves tokens between the backbone and patch-mixer widths."""

    def __init__(self, in_dim: int, out_dim: int, bias: bool, eps: float):
        super().__init__()
        self.norm = nn.LayerNorm(in_dim, eps=eps, bias=False)
        self.linear = nn.Linear(in_dim, out_dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(x))


class MicroDiTCaptionRefiner(nn.Module):
    """Pre-LN self-attention + SwiGLU block over the caption tokens (no modulation); `caption_mask` (see
    [`MicroDiTAttnProcessor`]) hides padded tokens from the attention."""

    def __init__(self, dim: int, head_dim: int, multiple_of: int, bias: bool, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps, bias=False)
        self.attn = MicroDiTAttention(dim, dim, dim // head_dim, bias=bias, eps=eps)
        self.norm2 = nn.LayerNorm(dim, eps=eps, bias=False)
        self.ff = MicroDiTSwiGLU(dim, swiglu_hidden_dim(int(4 * dim), multiple_of), bias=bias)

    def forward(self, x: torch.Tensor, caption_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), attention_mask=caption_mask)
        return x + self.ff(self.norm2(x))


class MicroDiTBlock(nn.Module):
    """adaLN-modulated DiT block: gated self-attention, un-gated un-modulated cross-attention, gated FFN.

    The modulation comes from `cond` (timestep + pooled caption, width `cond_dim`), through GELU(tanh) and one
    Linear producing shift/scale/gate for attention and FFN, in that order. `caption_mask` (see
    [`MicroDiTAttnProcessor`]) hides padded caption tokens from the cross-attention.
    """

    def __init__(self, dim: int, cond_dim: int, head_dim: int, attn_dim: int, ff: nn.Module, bias: bool, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps, bias=False)
        self.attn1 = MicroDiTAttention(dim, attn_dim, attn_dim // head_dim, bias=bias, eps=eps)
        self.norm2 = nn.LayerNorm(dim, eps=eps, bias=False)
        self.attn2 = MicroDiTAttention(dim, dim, dim // head_dim, bias=bias, eps=eps, is_cross_attention=True)
        self.norm3 = nn.LayerNorm(dim, eps=eps, bias=False)
        self.ff = ff
        self.modulation = nn.Linear(cond_dim, 6 * dim)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, cond: torch.Tensor, caption_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        modulation = self.modulation(F.gelu(cond, approximate="tanh")).unsqueeze(1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation.chunk(6, dim=-1)
        x = x + gate_msa * self.attn1(self.norm1(x) * (1 + scale_msa) + shift_msa)
        x = x + self.attn2(self.norm2(x), context, caption_mask)
        return x + gate_mlp * self.ff(self.norm3(x) * (1 + scale_mlp) + shift_mlp)



def init_attention(attn: MicroDiTAttention, out_std: float) -> None:
    for linear in (attn.to_q, attn.to_k, attn.to_v):
        nn.init.trunc_normal_(linear.weight, std=0.02)
    nn.init.trunc_normal_(attn.to_out[0].weight, std=out_std)


def init_feed_forward(ff: nn.Module, out_std: float) -> None:
    if isinstance(ff, MicroDiTExpertChoiceMoE):
        nn.init.trunc_normal_(ff.router.weight, std=0.02)
        nn.init.trunc_normal_(ff.w_in, std=0.02)
        nn.init.trunc_normal_(ff.w_out, std=out_std)
    else:
        nn.init.trunc_normal_(ff.gate_proj.weight, std=0.02)
        nn.init.trunc_normal_(ff.up_proj.weight, std=out_std)
        nn.init.trunc_normal_(ff.down_proj.weight, std=out_std)


def init_block(block: MicroDiTBlock, out_std: float) -> None:
    """Original init of one block: small output projections (`out_std`) and zero adaLN, so it starts as identity."""
    init_attention(block.attn1, out_std)
    init_attention(block.attn2, out_std)
    init_feed_forward(block.ff, out_std)
    nn.init.zeros_(block.modulation.weight)
