"""`Linear`: `nn.Linear` with faster fp32 CPU products: oneDNN for batches, C for decode rows.

Why, batches (training, prefill): PyTorch's `F.linear` runs MKL's sgemm, which on this AMD EPYC
(AVX-512) reaches ~200 GFLOP/s on 2 cores, while the same product through oneDNN, which ships
inside PyTorch (`torch.ops.mkldnn._linear_pointwise`, the op inductor emits for CPU linears),
reaches ~450 (the cores can do ~490); the backward's weight gradient ~350. oneDNN reads the
weight and the activations in place (a transposed view too), so the backward's two products
take it as well (`matmul_t`). It is used for fp32 on x86-64 CPUs where PyTorch has it;
`MAMBA_SLM_ONEDNN=0` or `torch.backends.mkldnn.enabled = False` gives `F.linear` back.

Why, decode rows: decoding one token multiplies one row by every weight matrix, so it is bound
by reading the weights from memory. For up to 16 rows, fp32 on a CPU without autograd,
`kernels.linear_rows` streams each weight once with both cores (1 row: ~2.3 ms for all 118 MB
of a 30M model's weights at ~50 GB/s; 16 rows: ~3.3 ms, where MKL takes 10-15). Where the C
kernels are not built, and inside `torch.compile`, the same product runs as a batched matmul
over the weight's row blocks (one block per core, ~32 GB/s). A subclass (not a function) so that
PEFT's LoRA layers, which wrap a `nn.Linear` and call it, keep the fast paths.
"""

from __future__ import annotations

import os
import platform

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import kernels

MAX_ROWS = kernels.LINEAR_ROWS  # above this the weight is re-read often enough that a GEMM is the faster path

# oneDNN keeps a compiled primitive per product shape (with scratch memory that grows with the
# rows) in two caches, oneDNN's and ideep's, of 1024 entries each by default: where shapes vary
# (chat batches padded to their longest conversation, prompts of any length) that grew `make demo`
# from 1.45 to 2.38 GB. With 32 entries it measured 1.38 GB, and a fixed-shape training step ran
# as fast (a miss costs one primitive creation, ~0.6 ms). Read when oneDNN first runs; a value
# already in the environment is kept.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "32")
os.environ.setdefault("LRU_CACHE_CAPACITY", "32")

_ONEDNN = (
    os.environ.get("MAMBA_SLM_ONEDNN", "1") != "0"
    and platform.machine().lower() in ("x86_64", "amd64")
    and torch.backends.mkldnn.is_available()
    and hasattr(torch.ops.mkldnn, "_linear_pointwise")
)


def onednn_ok(*tensors: Tensor) -> bool:
    """Whether `matmul_t` takes these tensors through oneDNN: fp32 on a CPU, outside torch.compile
    and tracing (exporters and compilers see F.linear, which they know)."""
    return (
        _ONEDNN
        and torch.backends.mkldnn.enabled
        and all(t.dtype is torch.float32 and t.device.type == "cpu" for t in tensors)
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
    )


def matmul_t(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x @ weight.T (+ bias), x (..., in), weight (out, in), either possibly a transposed view; no
    autograd. oneDNN for fp32 CPU tensors (see the module docstring), F.linear otherwise."""
    if not onednn_ok(x, weight):
        return F.linear(x, weight, bias)
    rows = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
    try:
        out = torch.ops.mkldnn._linear_pointwise(rows, weight, bias, "none", [], "")
    except RuntimeError:  # a layout oneDNN does not take, or bad shapes: F.linear computes or says why
        return F.linear(x, weight, bias)
    return out.view(*x.shape[:-1], weight.shape[0]) if x.dim() != 2 else out


class _OneDNNLinear(torch.autograd.Function):
    """F.linear's forward and backward with every product through `matmul_t`."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return matmul_t(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        grad_rows = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = matmul_t(grad, weight.t())
        if ctx.needs_input_grad[1]:
            grad_w = matmul_t(grad_rows.t(), x.reshape(-1, x.shape[-1]).t())
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_rows.sum(0)
        return grad_x, grad_w, grad_b


class Linear(nn.Linear):
    def forward(self, x: Tensor) -> Tensor:
        weight, bias = self.weight, self.bias  # module attribute lookups are slow; this runs per step
        rows, out_features = x.numel() // x.shape[-1], weight.shape[0]
        if x.device.type != "cpu" or x.dtype != weight.dtype or torch.is_autocast_enabled("cpu"):
            return F.linear(x, weight, bias)
        if rows > MAX_ROWS or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
            if onednn_ok(x, weight):
                return _OneDNNLinear.apply(x, weight, bias)
            return F.linear(x, weight, bias)
        if (
            x.dtype is torch.bfloat16
            and weight.is_contiguous()
            and not (torch.compiler.is_compiling() or torch.jit.is_tracing())
            and kernels.library() is not None
        ):
            # A bf16 model's decode-step products (the LM head, the layers the one-call step does
            # not cover): the C kernel reads the bf16 weight as stored and sums in fp32, where
            # PyTorch's bf16 products of a few rows took ~2-7x longer.
            bias32 = bias.float() if bias is not None else None
            return kernels.linear_rows(x.float().contiguous(), weight, bias32).to(torch.bfloat16)
        if x.dtype is torch.float32 and x.is_contiguous() and weight.is_contiguous():
            if torch.compiler.is_compiling():
                # In a compiled graph the operator's Python dispatch costs more than it saves for a
                # single row (the batched matmul below compiles well); from two rows on it wins.
                if kernels.loaded and rows > 1:
                    return torch.ops.mamba_slm.linear_rows(x, weight, bias)
            elif kernels.library() is not None:
                return kernels.linear_rows(x, weight, bias)
        parts = 4 if out_features % 4 == 0 else (2 if out_features % 2 == 0 else 1)
        if parts == 1:
            return F.linear(x, weight, bias)
        blocks = weight.view(parts, out_features // parts, -1)  # (parts, out/parts, in)
        xt = x.reshape(rows, -1).t().expand(parts, -1, -1)  # (parts, in, rows)
        out = torch.bmm(blocks, xt).permute(2, 0, 1).reshape(*x.shape[:-1], out_features)
        return out + bias if bias is not None else out
