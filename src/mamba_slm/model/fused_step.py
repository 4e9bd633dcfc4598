"""A hybrid model's whole one-token decode step as one call of the C kernels (`hybrid_step`).

Why: a batch-1 decode step of the ~30M benchmark model reads 118 MB of weights, 1.5-2 ms at
this machine's memory bandwidth, and the module path added ~0.9 ms around that: ~70
Python-level calls per step (module dispatch, fast-path checks, ctypes argument conversion),
and in the gaps between them the weight stream restarts cold. `hybrid_step` runs the same
kernels (`linear_rows`, `mamba2_step`, `attend_one`, `mlp_rows`) back to back inside one call.
Measured on 2 cores, same process: 3.20 -> 2.40 ms per batch-1 step at context 128, and
1.2-1.25x at context 4k, at batch 16 and for a left-padded batch.

The layers' weight pointers are gathered once per cache (one generation), like the other decode
fast paths' checks; the state pointers are refreshed whenever the cache replaces a state tensor
(beam search's row reordering, the KV buffers' growth). Anything the C step does not cover
falls back to the module path, which computes the same thing: autograd, torch.compile, a GPU,
non-fp32 weights, adapters or quantized layers (they are not plain `Linear`s), Mamba-1
mixers, ALiBi or a sliding window narrower than the context, more rows than the few-row
products are for. Left padding is covered: the attention skips the slots the cache marks as
padding.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from . import kernels
from .attention import Attention, AttentionInputs
from .cache import HybridCache, KVState, MambaState
from .linear import MAX_ROWS, Linear
from .ssm import Mamba2Mixer

_P, _L, _F = ctypes.c_void_p, ctypes.c_long, ctypes.c_float


class StepLayer(ctypes.Structure):
    """Mirrors `StepLayer` in kernels.c, field for field."""

    _fields_ = [
        ("kind", _L),
        ("norm_w", _P), ("norm_eps", _F),
        ("w_in", _P), ("b_in", _P), ("n_in", _L),
        ("w_out", _P), ("b_out", _P), ("n_mix", _L),
        ("conv_state", _P), ("ssm", _P),
        ("conv_wT", _P), ("conv_b", _P), ("dt_bias", _P), ("A_log", _P), ("D", _P), ("gnorm_w", _P),
        ("H", _L), ("P", _L), ("G", _L), ("N", _L), ("K", _L), ("gnorm_groups", _L), ("gnorm_eps", _F),
        ("w_k", _P), ("b_k", _P), ("w_v", _P), ("b_v", _P),
        ("k_cache", _P), ("v_cache", _P),
        ("heads", _L), ("kv_heads", _L), ("head_dim", _L), ("capacity", _L), ("kv_type", _L),
        ("mlp_norm_w", _P), ("mlp_eps", _F),
        ("w_gate", _P), ("w_up", _P), ("w_down", _P), ("inter", _L),
    ]  # fmt: skip


@dataclass
class StepPlan:
    layers: ctypes.Array  # of StepLayer, one per block
    keep: list  # tensors made for the plan (the conv taps, tap-major) that its pointers point into
    states: list = field(default_factory=list)  # the cache state tensors the pointers were taken from


def _ptr(t: Tensor | None) -> int | None:
    return t.data_ptr() if t is not None else None


def _plain(*modules: nn.Module) -> bool:
    """Plain `Linear`s (no adapter, no quantized wrapper) with fp32 contiguous CPU weights."""
    if any(type(m) is not Linear for m in modules):
        return False
    tensors = [t for m in modules for t in (m.weight, m.bias) if t is not None]
    return kernels.fp32_cpu(*tensors) and all(t.is_contiguous() for t in tensors)


def _mamba_layer(layer: StepLayer, m: Mamba2Mixer, keep: list) -> bool:
    params = [m.conv1d.weight, m.conv1d.bias, m.dt_bias, m.A_log, m.D, m.norm.weight]
    present = [p for p in params if p is not None]
    if not (_plain(m.in_proj, m.out_proj) and kernels.fp32_cpu(*present)):
        return False
    if not all(p.is_contiguous() for p in present):
        return False
    layer.kind = 0
    layer.w_in, layer.b_in, layer.n_in = (
        _ptr(m.in_proj.weight),
        _ptr(m.in_proj.bias),
        m.in_proj.weight.shape[0],
    )
    layer.w_out, layer.b_out, layer.n_mix = _ptr(m.out_proj.weight), _ptr(m.out_proj.bias), m.d_inner
    taps = m.conv1d.weight.view(m.conv_dim, -1).t().contiguous()  # once per plan, not per step
    keep.append(taps)
    layer.conv_wT, layer.conv_b = _ptr(taps), _ptr(m.conv1d.bias)
    layer.dt_bias, layer.A_log, layer.D, layer.gnorm_w = (_ptr(p) for p in params[2:])
    layer.H, layer.P, layer.G, layer.N = m.n_heads, m.head_dim, m.n_groups, m.d_state
    layer.K, layer.gnorm_groups, layer.gnorm_eps = m.conv1d.weight.shape[-1], m.norm.n_groups, m.norm.eps
    return True


def _attention_layer(layer: StepLayer, a: Attention) -> bool:
    if not _plain(a.q_proj, a.k_proj, a.v_proj, a.o_proj):
        return False
    layer.kind = 1
    layer.w_in, layer.b_in = _ptr(a.q_proj.weight), _ptr(a.q_proj.bias)
    layer.w_k, layer.b_k = _ptr(a.k_proj.weight), _ptr(a.k_proj.bias)
    layer.w_v, layer.b_v = _ptr(a.v_proj.weight), _ptr(a.v_proj.bias)
    layer.w_out, layer.b_out = _ptr(a.o_proj.weight), _ptr(a.o_proj.bias)
    layer.heads, layer.kv_heads, layer.head_dim = a.n_heads, a.n_kv_heads, a.head_dim
    layer.n_mix = a.n_heads * a.head_dim
    layer.n_in = layer.n_mix + 2 * a.n_kv_heads * a.head_dim
    return True


def build_plan(model: nn.Module) -> StepPlan | None:
    """The weight half of the plan, or None if some layer is not one the C step covers."""
    layers, keep = (StepLayer * len(model.layers))(), []
    for block, layer in zip(model.layers, layers, strict=True):
        if block.compiled_step is not None or not kernels.fp32_cpu(block.input_norm.weight):
            return None
        layer.norm_w, layer.norm_eps = _ptr(block.input_norm.weight), block.input_norm.eps
        if isinstance(block.mixer, Mamba2Mixer):
            covered = _mamba_layer(layer, block.mixer, keep)
        elif isinstance(block.mixer, Attention):
            covered = _attention_layer(layer, block.mixer)
        else:
            covered = False
        if not covered:
            return None
        if block.mlp is not None:
            weights = block._plain_mlp_weights()
            if weights is None:
                return None
            norm_w, layer.mlp_eps, gate, up, down = weights
            layer.mlp_norm_w, layer.w_gate, layer.w_up, layer.w_down = (
                _ptr(t) for t in (norm_w, gate, up, down)
            )
            layer.inter = gate.shape[0]
    return StepPlan(layers, keep)


def _bind_states(plan: StepPlan, cache: HybridCache) -> bool:
    """Point the plan at the cache's current state tensors (they change on row reordering and
    KV growth); False if one is not contiguous, or of a type the C step does not read (Mamba
    states: fp32; keys and values: fp32 or bf16)."""
    states = [(s.conv, s.ssm) if isinstance(s, MambaState) else (s.k, s.v) for s in cache.layers]
    if len(states) == len(plan.states) and all(
        a is c and b is d for (a, b), (c, d) in zip(states, plan.states, strict=True)
    ):
        return True
    for layer, (first, second), state in zip(plan.layers, states, cache.layers, strict=True):
        if not (first.is_contiguous() and second.is_contiguous() and first.device.type == "cpu"):
            return False
        if isinstance(state, KVState):
            if first.dtype not in kernels.KV_TYPES or second.dtype != first.dtype:
                return False
            layer.k_cache, layer.v_cache, layer.capacity = first.data_ptr(), second.data_ptr(), first.shape[2]
            layer.kv_type = kernels.KV_TYPES[first.dtype]
        else:
            if not kernels.fp32_cpu(first, second):
                return False
            layer.conv_state, layer.ssm = first.data_ptr(), second.data_ptr()
    plan.states = states
    return True


def _padding_at_most(config, attn: AttentionInputs | None, cache: HybridCache) -> bool:
    """Whether this step's attention mask, if any, only hides padding, which the C step reads
    from the cache's valid slots; ALiBi biases and a sliding window narrower than the context
    are the module path's."""
    if attn is None or attn.mask is None:
        return True
    window = config.sliding_window
    return (
        config.pos_encoding != "alibi"
        and (window is None or window > cache.seqlen)
        and cache.valid.is_contiguous()
    )


def run(model: nn.Module, hidden: Tensor, attn: AttentionInputs | None, cache: HybridCache) -> bool:
    """Advance `hidden` (b, 1, d_model), the embedded tokens, through every block in place and
    the cache's states with it. False (nothing done) where the module path must run instead."""
    rows = hidden.shape[0]
    if (
        rows > MAX_ROWS
        or torch.is_grad_enabled()
        or torch.compiler.is_compiling()
        or not kernels.fp32_cpu(hidden)
        or not hidden.is_contiguous()
        or not _padding_at_most(model.config, attn, cache)
    ):
        return False
    key = (model, "hybrid_step")
    if key not in cache.memo:
        cache.memo[key] = build_plan(model)
    plan = cache.memo[key]
    if plan is None or not _bind_states(plan, cache):
        return False
    cos = sin = None
    if attn is not None and attn.cos is not None:
        cos, sin = attn.cos.contiguous(), attn.sin.contiguous()
    valid = cache.valid if cache.padded else None  # which slots are real tokens, per row
    done = kernels.library().hybrid_step(
        plan.layers, len(plan.layers), hidden.data_ptr(), rows, hidden.shape[-1], _ptr(cos), _ptr(sin),
        _ptr(valid), cache.capacity, cache.seqlen, torch.get_num_threads(),
    )  # fmt: skip
    return bool(done)
