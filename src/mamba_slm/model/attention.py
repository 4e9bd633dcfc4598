"""Causal self-attention: GQA, RoPE (linear / NTK / YaRN scaling), ALiBi or no positions,
optional sliding window, a KV cache, and `scaled_dot_product_attention` for the math.

The mask (and RoPE's cos/sin) depend only on positions, not on the layer, so `AttentionInputs`
is built once per forward pass by `build_attention_inputs` and shared by every attention layer.
When nothing needs a mask (no padding, no window, no ALiBi, no cached prefix) SDPA runs with
`is_causal=True`, which takes PyTorch's fused flash-attention kernels on CPU and on CUDA
(FlashAttention-2 inside SDPA), so no separate flash-attn package is needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ModelConfig
from . import kernels
from .cache import HybridCache
from .linear import Linear


def rope_inv_freq(config: ModelConfig) -> tuple[Tensor, float]:
    """Inverse frequencies (head_dim/2,) and the attention scale factor for the configured scaling."""
    dim, base = config.attn_head_dim, config.rope_theta
    scaling = config.rope_scaling or {}
    kind, factor = scaling.get("type"), float(scaling.get("factor", 1.0))
    exponents = torch.arange(0, dim, 2, dtype=torch.float64) / dim
    if kind == "ntk":  # stretch the base so the lowest frequency covers factor x the context
        base = base * factor ** (dim / (dim - 2))
    inv_freq = 1.0 / base**exponents
    if kind == "linear":
        return (inv_freq / factor).float(), 1.0
    if kind == "yarn":
        original = scaling.get("original_max_position_embeddings", config.max_position_embeddings)
        beta_fast, beta_slow = scaling.get("beta_fast", 32.0), scaling.get("beta_slow", 1.0)

        def dim_for_rotations(rotations: float) -> float:  # the dim whose wavelength fits `rotations` times
            return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low = max(math.floor(dim_for_rotations(beta_fast)), 0)
        high = min(math.ceil(dim_for_rotations(beta_slow)), dim - 1)
        ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / max(high - low, 1e-3)).clamp(0, 1)
        keep = 1.0 - ramp  # 1: high frequency, kept (extrapolated); 0: low frequency, interpolated
        inv_freq = inv_freq / factor * (1 - keep) + inv_freq * keep
        return inv_freq.float(), 0.1 * math.log(factor) + 1.0
    return inv_freq.float(), 1.0


def alibi_slopes(n_heads: int) -> Tensor:
    """ALiBi head slopes: a geometric sequence, interleaved for a non-power-of-two head count."""

    def powers(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start**i for i in range(1, n + 1)]

    closest = 2 ** math.floor(math.log2(n_heads))
    slopes = powers(closest)
    if closest < n_heads:
        slopes += powers(2 * closest)[0::2][: n_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


@dataclass
class AttentionInputs:
    cos: Tensor | None  # (b, l, head_dim) for RoPE
    sin: Tensor | None
    mask: Tensor | None  # bool (b, 1, l, T) or float bias (b, h, l, T); None with is_causal or no mask
    is_causal: bool


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_cos_sin(
    inv_freq: Tensor, rope_factor: float, positions: Tensor, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """RoPE's cos and sin (b, l, head_dim) at positions (b, l)."""
    freqs = positions[..., None].float() * inv_freq.to(positions.device)  # (b, l, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)
    return (emb.cos() * rope_factor).to(dtype), (emb.sin() * rope_factor).to(dtype)


def build_attention_inputs(
    config: ModelConfig,
    inv_freq: Tensor,
    rope_factor: float,
    positions: Tensor,
    key_valid: Tensor | None,
    offset: int,
    dtype: torch.dtype,
) -> AttentionInputs:
    """positions: (b, l) per-token positions; key_valid: (b, T) real-token slots or None (no padding);
    offset: slot index of the first new token (tokens already cached)."""
    b, q_len = positions.shape
    device = positions.device
    cos = sin = None
    if config.pos_encoding == "rope":
        cos, sin = rope_cos_sin(inv_freq, rope_factor, positions, dtype)
    alibi = config.pos_encoding == "alibi"
    window = config.sliding_window
    k_len = offset + q_len
    if key_valid is None and not alibi and (window is None or window >= k_len):
        if offset == 0:
            return AttentionInputs(cos, sin, None, q_len > 1)
        if q_len == 1:
            return AttentionInputs(cos, sin, None, False)
    q_slot = torch.arange(offset, k_len, device=device)[:, None]
    k_slot = torch.arange(k_len, device=device)[None, :]
    allowed = k_slot <= q_slot  # (l, T)
    if window is not None:
        allowed = allowed & (q_slot - k_slot < window)
    if key_valid is not None:
        # A padding query would see no key at all (NaN); let it see itself, its output is ignored.
        allowed = (allowed[None] & key_valid[:, None, :]) | (k_slot == q_slot)[None]
    else:
        allowed = allowed[None].expand(b, -1, -1)
    mask = allowed[:, None]  # (b, 1, l, T)
    if alibi:
        slopes = alibi_slopes(config.n_heads).to(device)
        distance = (q_slot - k_slot).float()  # (l, T)
        bias = -slopes[:, None, None] * distance  # (h, l, T)
        mask = bias[None].masked_fill(~mask, float("-inf")).to(dtype)  # (b, h, l, T)
    return AttentionInputs(cos, sin, mask, False)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        c = config
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = c.n_heads, c.n_kv_heads, c.attn_head_dim
        self.q_proj = Linear(c.d_model, c.n_heads * self.head_dim, bias=False)
        self.k_proj = Linear(c.d_model, c.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = Linear(c.d_model, c.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = Linear(c.n_heads * self.head_dim, c.d_model, bias=False)

    def forward(self, hidden: Tensor, inputs: AttentionInputs, cache: HybridCache | None = None) -> Tensor:
        q, k, v = self.project(hidden, inputs.cos, inputs.sin)
        return self.o_proj(self.attend(q, k, v, inputs, cache))

    def project(
        self, hidden: Tensor, cos: Tensor | None, sin: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Queries, keys and values (b, heads, l, hd), rotated by RoPE when cos/sin (b, l, hd) are given."""
        b, q_len, _ = hidden.shape
        q = self.q_proj(hidden).view(b, q_len, self.n_heads, self.head_dim)
        k = self.k_proj(hidden).view(b, q_len, self.n_kv_heads, self.head_dim)
        v = self.v_proj(hidden).view(b, q_len, self.n_kv_heads, self.head_dim)
        if cos is not None:
            cos, sin = cos[:, :, None], sin[:, :, None]  # (b, l, 1, hd)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def attend(
        self, q: Tensor, k: Tensor, v: Tensor, inputs: AttentionInputs, cache: HybridCache | None
    ) -> Tensor:
        """Attention of the new queries over the cached and new keys. Returns (b, l, heads * hd)."""
        b, _, q_len, _ = q.shape
        if cache is not None:
            k, v = cache.append_kv(self.layer_idx, k, v)  # (b, hkv, T, hd)
            if k.dtype != q.dtype:  # a 16-bit KV cache: the stored (rounded) values, in the model's dtype
                k, v = k.to(q.dtype), v.to(q.dtype)
        repeat = self.n_heads // self.n_kv_heads
        if (
            q_len == 1
            and inputs.mask is None
            and not torch.compiler.is_compiling()
            and q.device.type == "cpu"
            and q.dtype == k.dtype == v.dtype == torch.float32
            and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
            and kernels.library() is not None
        ):
            return kernels.attend_one(q, k, v)  # one pass over the cache, GQA without copies
        if repeat > 1 and q_len == 1 and (inputs.mask is None or inputs.mask.shape[1] == 1):
            # One query per head: a KV head's `repeat` query heads are `repeat` queries against it,
            # so GQA decode reads each cached key once instead of copying the cache `repeat` times.
            q = q.view(b, self.n_kv_heads, repeat, self.head_dim)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=inputs.mask)  # (b, hkv, repeat, hd)
            return out.reshape(b, 1, self.n_heads * self.head_dim)
        if repeat > 1:
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=inputs.mask, is_causal=inputs.is_causal)
        return out.transpose(1, 2).reshape(b, q_len, self.n_heads * self.head_dim)
