"""A hybrid model's whole decode step as one call of the C kernels (`hybrid_step`).

Why: a batch-1 decode step of the ~30M benchmark model reads 118 MB of weights, 1.5-2 ms at
this machine's memory bandwidth, and the module path added ~0.9 ms around that: ~70
Python-level calls per step (module dispatch, fast-path checks, ctypes argument conversion),
and in the gaps between them the weight stream restarts cold. `hybrid_step` runs the same
kernels (`linear_rows`, the Mamba-2 step, the one-query attention, `mlp_rows`) back to back inside
one call.
Measured on 2 cores, same process: 3.20 -> 2.40 ms per batch-1 step at context 128, and
1.2-1.25x at context 4k, at batch 16 and for a left-padded batch.

The same call also takes up to MAX_ROWS tokens of one row (a short prompt's prefill, a draft
that speculative decoding verifies): the products read each weight once for all of them, the
Mamba recurrences run token after token, and each token attends up to its own slot. Measured on
the benchmark model, 4 tokens of one row cost about one one-token step (the module path, about
twice that; several times that on smaller models); with `HybridCache.keep_trail` it keeps each Mamba layer's states from before the pass and its
in_proj outputs, so that rejected draft tokens can be taken back (`HybridCache.rewind`: the
recurrence runs again over the kept tokens, `hybrid_rewind`).

Plain greedy decoding goes one step further (`greedy`, `hybrid_greedy`): a chunk of steps in
one call, the embedding, the final norm, the LM head and the argmax in C too (rounded to bf16
where a bf16 model's module path rounds), so that no Python runs between the steps of a chunk.
Same tokens; measured on the benchmark model, same process, in a slow stretch of this VM:
batch-1 greedy `generate` 1.11-1.22x (fp32), 1.12x (bf16).

A bf16 model's step reads its weight matrices as stored, half the bytes of fp32, and computes in
fp32 (its hidden state is widened for the call, its Mamba states are fp32 in every cache, the
small parameters are widened once per plan): a batch-1 step reads about half as much.

The layers' weight pointers (and the fp32 copies: conv taps, a bf16 model's small parameters) are
gathered once per cache, that is once per generation, like the other decode fast paths' checks:
weights edited in place in the middle of a generation are not all seen until the next one. The
state pointers are refreshed whenever the cache replaces a state tensor (beam search's row
reordering, the KV buffers' growth). Anything the C step does not cover
falls back to the module path, which computes the same thing: autograd, torch.compile, a GPU,
weights other than fp32 or bf16, adapters or quantized layers (they are not plain `Linear`s),
Mamba-1 mixers, ALiBi or a sliding window narrower than the context, more rows than the
few-row products are for. Left padding is covered: the attention skips the slots the cache
marks as padding.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Sequence
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
        ("kind", _L), ("w_type", _L),
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
    keep: list  # tensors made for the plan (fp32 copies, the conv taps tap-major) its pointers point into
    states: list = field(default_factory=list)  # the cache state tensors the pointers were taken from


class _NotCovered(Exception):
    """A layer the C step does not cover: the module path runs instead."""


def _ptr(t: Tensor | None) -> int | None:
    return t.data_ptr() if t is not None else None


def _fp32(t: Tensor | None, keep: list) -> int | None:
    """The address of t as a contiguous fp32 CPU tensor: t itself, or a copy the plan keeps."""
    if t is None:
        return None
    if t.device.type != "cpu":
        raise _NotCovered
    if not (t.dtype is torch.float32 and t.is_contiguous()):
        t = t.detach().float().contiguous()
        keep.append(t)
    return t.data_ptr()


def _matrices(layer: StepLayer, *modules: nn.Module) -> list[int]:
    """The weight addresses of plain `Linear`s (no adapter, no quantized wrapper): contiguous CPU
    matrices of one element type the kernels read (fp32 or bf16), which sets the layer's w_type."""
    if any(type(m) is not Linear for m in modules):
        raise _NotCovered
    weights = [m.weight for m in modules]
    dtype = weights[0].dtype
    if dtype not in kernels.ELEMENT_TYPES or not all(
        w.dtype == dtype and w.device.type == "cpu" and w.is_contiguous() for w in weights
    ):
        raise _NotCovered
    layer.w_type = kernels.ELEMENT_TYPES[dtype]
    return [w.data_ptr() for w in weights]


def _mamba_layer(layer: StepLayer, m: Mamba2Mixer, keep: list) -> None:
    (layer.w_in, layer.w_out), layer.n_in = _matrices(layer, m.in_proj, m.out_proj), m.in_proj.weight.shape[0]
    layer.b_in, layer.b_out, layer.n_mix = (
        _fp32(m.in_proj.bias, keep),
        _fp32(m.out_proj.bias, keep),
        m.d_inner,
    )
    layer.kind = 0
    layer.conv_wT = _fp32(m.conv1d.weight.view(m.conv_dim, -1).t(), keep)  # tap-major, once per plan
    layer.conv_b, layer.dt_bias, layer.A_log, layer.D, layer.gnorm_w = (
        _fp32(p, keep) for p in (m.conv1d.bias, m.dt_bias, m.A_log, m.D, m.norm.weight)
    )
    layer.H, layer.P, layer.G, layer.N = m.n_heads, m.head_dim, m.n_groups, m.d_state
    layer.K, layer.gnorm_groups, layer.gnorm_eps = m.conv1d.weight.shape[-1], m.norm.n_groups, m.norm.eps


def _attention_layer(layer: StepLayer, a: Attention, keep: list) -> None:
    layer.w_in, layer.w_k, layer.w_v, layer.w_out = _matrices(layer, a.q_proj, a.k_proj, a.v_proj, a.o_proj)
    layer.b_in, layer.b_k, layer.b_v, layer.b_out = (
        _fp32(p.bias, keep) for p in (a.q_proj, a.k_proj, a.v_proj, a.o_proj)
    )
    layer.kind = 1
    layer.heads, layer.kv_heads, layer.head_dim = a.n_heads, a.n_kv_heads, a.head_dim
    layer.n_mix = a.n_heads * a.head_dim
    layer.n_in = layer.n_mix + 2 * a.n_kv_heads * a.head_dim


def _mlp(layer: StepLayer, block: nn.Module, keep: list) -> None:
    projections = (block.mlp.gate_proj, block.mlp.up_proj, block.mlp.down_proj)
    if any(p.bias is not None for p in projections):
        raise _NotCovered
    w_type = layer.w_type
    layer.w_gate, layer.w_up, layer.w_down = _matrices(layer, *projections)
    if layer.w_type != w_type:  # one element type per layer
        raise _NotCovered
    layer.mlp_norm_w, layer.mlp_eps = _fp32(block.mlp_norm.weight, keep), block.mlp_norm.eps
    layer.inter = projections[0].weight.shape[0]


def build_plan(model: nn.Module) -> StepPlan | None:
    """The weight half of the plan, or None if some layer is not one the C step covers."""
    layers, keep = (StepLayer * len(model.layers))(), []
    try:
        for block, layer in zip(model.layers, layers, strict=True):
            if block.compiled_step is not None:
                return None
            layer.norm_w, layer.norm_eps = _fp32(block.input_norm.weight, keep), block.input_norm.eps
            if isinstance(block.mixer, Mamba2Mixer):
                _mamba_layer(layer, block.mixer, keep)
            elif isinstance(block.mixer, Attention):
                _attention_layer(layer, block.mixer, keep)
            else:
                return None
            if block.mlp is not None:
                _mlp(layer, block, keep)
    except _NotCovered:
        return None
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


def _padding_at_most(config, attn: AttentionInputs | None, cache: HybridCache, new_len: int) -> bool:
    """Whether this pass's attention mask, if any, only hides padding and later tokens, which the
    C step reads from the cache's valid slots and its own slot order; ALiBi biases and a sliding
    window narrower than the context are the module path's."""
    if attn is None or attn.mask is None:
        return True
    window = config.sliding_window
    return (
        config.pos_encoding != "alibi"
        and (window is None or window >= cache.seqlen + new_len)
        and cache.valid.is_contiguous()
    )


def _trails(plan: StepPlan, cache: HybridCache) -> ctypes.Array:
    """Per Mamba layer, room for what `hybrid_rewind` needs (its states before a pass, its in_proj
    outputs for up to MAX_ROWS tokens); the cache's buffers, reused pass after pass (a fresh one
    each pass cost more in page faults than the copies themselves)."""
    sizes = [
        s.conv.numel() + s.ssm.numel() + MAX_ROWS * layer.n_in if isinstance(s, MambaState) else 0
        for s, layer in zip(cache.layers, plan.layers, strict=True)
    ]
    buffers = cache.memo.get("trails")
    if buffers is None or [0 if b is None else b.numel() for b in buffers] != sizes:
        # fp32 on the CPU, like the states the C step reads (whatever torch's defaults)
        buffers = [s.ssm.new_empty(n) if n else None for s, n in zip(cache.layers, sizes, strict=True)]
        cache.memo["trails"] = buffers
    return (ctypes.c_void_p * len(buffers))(*(_ptr(b) for b in buffers))


def _states_after(plan: StepPlan, trails: ctypes.Array, keep: int) -> None:
    """The cache's Mamba states as after the first `keep` tokens of the pass that filled `trails`."""
    if not kernels.library().hybrid_rewind(
        plan.layers, len(plan.layers), trails, keep, torch.get_num_threads()
    ):
        raise MemoryError("rewind: no memory for the Mamba recurrence's scratch")


def _bound_plan(model: nn.Module, cache: HybridCache) -> StepPlan | None:
    """The model's plan (made once per cache), pointing at the cache's current states; None if
    the C step does not cover them."""
    key = (model, "hybrid_step")
    if key not in cache.memo:
        cache.memo[key] = build_plan(model)
    plan = cache.memo[key]
    return plan if plan is not None and _bind_states(plan, cache) else None


def greedy_covers(model: nn.Module, tokens: Tensor, cache: HybridCache) -> bool:
    """Whether `greedy` takes these rows: an fp32 or bf16 CPU model whose every layer the C step
    covers, with a plain final norm and LM head of its embedding's type, and at most MAX_ROWS
    rows, outside autograd."""
    embed, head = model.embed_tokens.weight, model.lm_head
    return (
        tokens.shape[0] <= MAX_ROWS
        and not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and kernels.library() is not None
        and type(head) is Linear
        and head.bias is None
        and tokens.device.type == "cpu"
        and embed.device.type == "cpu"
        and embed.dtype in kernels.ELEMENT_TYPES
        and head.weight.dtype == embed.dtype == model.norm.weight.dtype
        and embed.is_contiguous()
        and head.weight.is_contiguous()
        and _bound_plan(model, cache) is not None
    )


def greedy(
    model: nn.Module,
    tokens: Tensor,
    cache: HybridCache,
    cos: Tensor | None,
    sin: Tensor | None,
    stop_ids: Sequence[int],
    finished: Tensor,
    steps: int,
) -> Tensor | None:
    """`hybrid_greedy`: up to `steps` greedy steps for the rows' current `tokens` (b,), where
    `greedy_covers` them; the cache has reserved their slots (`begin`), cos/sin (steps, b,
    head_dim) are their rotary inputs (None without RoPE). Returns their next tokens (k, b),
    k <= steps (fewer once every row is `finished`, (b,) bool, updated), or None (nothing done)
    where `HybridLM.forward` must run."""
    plan = _bound_plan(model, cache)  # again: begin() may have grown the KV buffers
    if plan is None:
        return None
    rows = tokens.shape[0]
    embed, head, norm = model.embed_tokens.weight, model.lm_head, model.norm
    tokens = tokens.to(torch.long).contiguous()
    stops = torch.tensor(list(stop_ids), dtype=torch.long)
    out = torch.empty(steps, rows, dtype=torch.long)
    flags = finished.to(torch.uint8).contiguous()  # C's unsigned char
    norm_w = norm.weight.float().contiguous()
    done = kernels.library().hybrid_greedy(
        plan.layers, len(plan.layers), embed.data_ptr(), kernels.ELEMENT_TYPES[embed.dtype],
        norm_w.data_ptr(), norm.eps, head.weight.data_ptr(), embed.shape[0], embed.shape[1],
        tokens.data_ptr(), rows, steps, _ptr(cos), _ptr(sin), cos.shape[-1] if cos is not None else 0,
        _ptr(cache.valid if cache.padded else None),
        cache.capacity, cache.seqlen, stops.data_ptr(), stops.numel(), flags.data_ptr(), out.data_ptr(),
        torch.get_num_threads(),
    )  # fmt: skip
    if done <= 0:
        return None
    finished.copy_(flags.bool())
    return out[:done]


def run(model: nn.Module, hidden: Tensor, attn: AttentionInputs | None, cache: HybridCache) -> bool:
    """Advance `hidden`, the embedded tokens, through every block in place and the cache's states
    with it: (b, 1, d_model), one token for each of b rows, or (1, l, d_model), l tokens of one
    row (a short prefill, a draft to verify; with `cache.keep_trail` it leaves `cache.states_after` for rewinding). False
    (nothing done) where the module path must run instead."""
    batch, new_len = hidden.shape[:2]
    seq = new_len > 1
    rows = new_len if seq else batch  # of the few-row products
    if (
        (seq and batch > 1)
        or rows > MAX_ROWS
        or torch.is_grad_enabled()
        or torch.compiler.is_compiling()
        or kernels.library() is None
        or hidden.device.type != "cpu"
        or hidden.dtype not in kernels.ELEMENT_TYPES
        or not _padding_at_most(model.config, attn, cache, new_len)
    ):
        return False
    plan = _bound_plan(model, cache)
    if plan is None:
        return False
    cos = sin = None
    if attn is not None and attn.cos is not None:
        cos, sin = attn.cos.float().contiguous(), attn.sin.float().contiguous()
    valid = cache.valid if cache.padded else None  # which slots are real tokens, per row
    x = hidden.float().contiguous()  # hidden itself when it is fp32 and contiguous
    trails = _trails(plan, cache) if seq and cache.keep_trail else None
    done = kernels.library().hybrid_step(
        plan.layers, len(plan.layers), x.data_ptr(), rows, hidden.shape[-1], _ptr(cos), _ptr(sin),
        _ptr(valid), cache.capacity, cache.seqlen, int(seq), trails, torch.get_num_threads(),
    )  # fmt: skip
    if done and x is not hidden:
        hidden.copy_(x)
    if done and trails is not None:
        cache.states_after = functools.partial(_states_after, plan, trails)
    return bool(done)
