"""`Linear`: `nn.Linear` with a faster product for the few rows of a CPU decode step.

Why: decoding one token multiplies one row by every weight matrix, so it is bound by reading the
weights from memory. For a single row MKL's sgemm falls back to a one-thread matrix-vector
product (measured here: ~16 GB/s on 2 cores, 8.4 ms per token for a 30M-parameter model). For
up to 16 rows, fp32 on a CPU without autograd, `kernels.linear_rows` streams each weight once
with both cores and multiplies it with every row while it sits in L1 (~43 GB/s; 2.7 ms per token
for all the weights, 6.4 ms for 16 rows against MKL's 10.5). Where the C kernels are not
built, and inside `torch.compile`, the same product runs as a batched matmul over the weight's
row blocks (one block per core, ~32 GB/s). Training and large batches take `F.linear`. A
subclass (not a function) so that PEFT's LoRA layers, which wrap a `nn.Linear` and call it,
keep the fast path and are never bypassed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import kernels

MAX_ROWS = 16  # above this the weight is re-read often enough that MKL's gemm is the faster path


class Linear(nn.Linear):
    def forward(self, x: Tensor) -> Tensor:
        weight, bias = self.weight, self.bias  # module attribute lookups are slow; this runs per step
        rows, out_features = x.numel() // x.shape[-1], weight.shape[0]
        if (
            rows > MAX_ROWS
            or x.device.type != "cpu"
            or x.dtype != weight.dtype
            or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            or torch.is_autocast_enabled("cpu")
        ):
            return F.linear(x, weight, bias)
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
