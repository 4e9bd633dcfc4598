"""Memory-bound ops with hand-written backward passes: conv+SiLU, gated RMSNorm, SwiGLU.

Why: under autograd, the causal depthwise conv (written as shifted multiply-adds) zero-fills a
full-size gradient for every shifted slice, the gated RMSNorm keeps four (L x d_inner) tensors
alive and SwiGLU keeps three. Each Function below saves only its inputs and does its backward
in a few passes (recomputing the cheap activations), which cuts a CPU training step's time and
its activation memory. For fp32 on a CPU, forward and backward run as single fused loops
from `kernels.py` when its C library could be built; the PyTorch code here is the fallback and
the same math. Both are checked against plain autograd in tests/test_fused.py.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from . import kernels
from .linear import matmul_t


def autocast_off(method):
    """Run a Function's forward/backward in the dtypes it is given: autocast would otherwise
    recast some ops inside it (and not others) and mix dtypes."""

    @functools.wraps(method)
    def wrapper(ctx, *args):
        device = next(a.device.type for a in args if isinstance(a, Tensor))
        with torch.autocast(device, enabled=False):
            return method(ctx, *args)

    return wrapper


def rowdot(a: Tensor, b: Tensor) -> Tensor:
    """(a * b).sum(-1), in fp32."""
    if kernels.supports(a, b):
        return kernels.rowdot(a, b)
    return (a * b).sum(-1).float()


def _conv(x: Tensor, weight: Tensor, bias: Tensor | None, padded: Tensor | None = None) -> Tensor:
    """Causal depthwise conv. x: (b, l, c), weight: (c, k) -> (b, l, c); `padded` is x with k-1
    leading zero steps, if the caller has it already."""
    k, seqlen = weight.shape[1], x.shape[1]
    if padded is None:
        padded = F.pad(x, (0, 0, k - 1, 0))
    out = padded[:, k - 1 :] * weight[:, k - 1]
    if bias is not None:
        out += bias
    for i in range(k - 1):
        out.addcmul_(padded[:, i : i + seqlen], weight[:, i])
    return out


def _conv_silu(x: Tensor, weight: Tensor, bias: Tensor | None, prev: Tensor | None = None) -> Tensor:
    if kernels.supports(x, weight, bias, prev):
        return kernels.conv_silu_forward(x, weight, bias, prev)
    padded = torch.cat([prev.to(x.dtype), x], dim=1) if prev is not None else None
    return F.silu(_conv(x, weight, bias, padded))


class _ConvSiLU(torch.autograd.Function):
    @staticmethod
    @autocast_off
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight, bias)
        return _conv_silu(x, weight, bias)

    @staticmethod
    @autocast_off
    def backward(ctx, dout):
        x, weight, bias = ctx.saved_tensors
        if kernels.supports(x, weight, bias, dout):
            return kernels.conv_silu_backward(x, weight, bias, dout)
        k, seqlen = weight.shape[1], x.shape[1]
        xpad = F.pad(x, (0, 0, k - 1, 0))
        dpre = torch.ops.aten.silu_backward(dout, _conv(x, weight, bias, xpad))
        # out[t] = sum_i w_i x[t - (k-1) + i]  =>  dx[t] = sum_i w_i dpre[t + (k-1) - i]
        dpad = F.pad(dpre, (0, 0, 0, k - 1))
        dx = dpre * weight[:, k - 1]
        for i in range(k - 1):
            dx.addcmul_(dpad[:, k - 1 - i : k - 1 - i + seqlen], weight[:, i])
        dweight = torch.stack([(dpre * xpad[:, i : i + seqlen]).sum((0, 1)) for i in range(k)], dim=1)
        dbias = dpre.sum((0, 1)) if bias is not None else None
        return dx, dweight, dbias


def conv_silu(x: Tensor, weight: Tensor, bias: Tensor | None, prev: Tensor | None = None) -> Tensor:
    """silu(causal depthwise conv(x)). x: (b, l, c), weight: (c, k), bias: (c,) or None;
    prev: the (b, k-1, c) inputs before x (a cached window; inference only) or None for zeros."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        if prev is not None:
            raise ValueError("conv_silu: a cached window is for inference (no gradients)")
        return _ConvSiLU.apply(x, weight, bias)
    return _conv_silu(x, weight, bias, prev)


class _GatedRMSNorm(torch.autograd.Function):
    @staticmethod
    @autocast_off
    def forward(ctx, y, z, weight, n_groups, eps):
        ctx.save_for_backward(y, z, weight)
        ctx.n_groups, ctx.eps = n_groups, eps
        if kernels.supports(y, z, weight):
            return kernels.gated_norm_forward(y, z, weight, n_groups, eps)
        return _gated_rms_norm(y, z, weight, n_groups, eps)

    @staticmethod
    @autocast_off
    def backward(ctx, dout):
        y, z, weight = ctx.saved_tensors
        groups, eps = ctx.n_groups, ctx.eps
        if kernels.supports(y, z, weight, dout):
            return (*kernels.gated_norm_backward(y, z, weight, dout, groups, eps), None, None)
        shape = y.shape
        s = F.silu(z)
        u = (y * s).view(*shape[:-1], groups, -1)  # (..., g, d/g)
        r = torch.rsqrt(u.square().mean(-1, keepdim=True) + eps)
        dn = (dout * weight.to(dout.dtype)).view_as(u)  # grad of the normalised u
        du = r * dn - u * (r**3 * (dn * u).mean(-1, keepdim=True))
        dweight = (dout.float() * (u * r).view(shape).float()).reshape(-1, shape[-1]).sum(0)
        du = du.view(shape)
        dy = du * s
        dz = torch.ops.aten.silu_backward(du * y, z)
        return dy, dz, dweight, None, None


def _gated_rms_norm(y: Tensor, z: Tensor, weight: Tensor, n_groups: int, eps: float) -> Tensor:
    u = y * F.silu(z)
    weight = weight.to(u.dtype)
    if n_groups == 1:
        return F.rms_norm(u, weight.shape, weight, eps)
    shape = u.shape
    u = F.rms_norm(u.view(*shape[:-1], n_groups, -1), (shape[-1] // n_groups,), eps=eps)
    return u.view(shape) * weight


def gated_rms_norm(y: Tensor, z: Tensor, weight: Tensor, n_groups: int = 1, eps: float = 1e-5) -> Tensor:
    """RMSNorm(y * silu(z)) * weight, normalised over groups of the last dim (Mamba-2's norm)."""
    if torch.is_grad_enabled() and (y.requires_grad or z.requires_grad or weight.requires_grad):
        return _GatedRMSNorm.apply(y, z, weight, n_groups, eps)
    if kernels.supports(y, z, weight):
        return kernels.gated_norm_forward(y, z, weight, n_groups, eps)
    return _gated_rms_norm(y, z, weight, n_groups, eps)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    @autocast_off
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        if kernels.supports(gate, up):
            return kernels.swiglu_forward(gate, up)
        return F.silu(gate).mul_(up)

    @staticmethod
    @autocast_off
    def backward(ctx, dout):
        gate, up = ctx.saved_tensors
        if kernels.supports(gate, up, dout):
            return kernels.swiglu_backward(gate, up, dout)
        dup = dout * F.silu(gate)
        dgate = torch.ops.aten.silu_backward(dout * up, gate)
        return dgate, dup


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up."""
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return _SwiGLU.apply(gate, up)
    if kernels.supports(gate, up):
        return kernels.swiglu_forward(gate, up)
    return F.silu(gate).mul_(up)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    @autocast_off
    def forward(ctx, x, weight, eps):
        ctx.save_for_backward(x, weight)
        ctx.eps = eps
        return kernels.rms_norm_forward(x, weight, eps)

    @staticmethod
    @autocast_off
    def backward(ctx, dout):
        x, weight = ctx.saved_tensors
        return (*kernels.rms_norm_backward(x, weight, dout, ctx.eps), None)


def _bf16_cpu_inference(x: Tensor, weight: Tensor) -> bool:
    return (
        x.dtype is torch.bfloat16
        and weight.dtype is torch.bfloat16
        and x.device.type == "cpu"
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and not torch.compiler.is_compiling()
        and kernels.library() is not None
    )


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm over the last dim, times weight: fused CPU kernels for fp32, else F.rms_norm.
    At every size: F.rms_norm is a composite of six ops, slower than one ctypes call even for the
    single row of a decode step. A bf16 model's inference on a CPU takes the fp32 kernel on the
    widened values, rounded once to bf16: what the greedy C loop (`hybrid_greedy`) computes too."""
    if not kernels.fp32_cpu(x, weight):
        if _bf16_cpu_inference(x, weight):
            return kernels.rms_norm_forward(x.float(), weight.float(), eps).to(torch.bfloat16)
        return F.rms_norm(x, weight.shape, weight, eps)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _RMSNorm.apply(x, weight, eps)
    return kernels.rms_norm_forward(x, weight, eps)


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of (hidden @ weight^T) against targets, in chunks of rows.

    The gradients are computed during the forward pass, chunk by chunk, so the (N x vocab)
    logits, their log-softmax and their gradient never exist at once (the LM head's three
    largest tensors in training); the FLOPs are the same as unfused forward + backward.
    """

    @staticmethod
    @autocast_off
    def forward(ctx, hidden, weight, targets, chunk_rows):
        valid_all = targets != -100
        n_valid = valid_all.sum().clamp_min(1)
        want_w = weight.requires_grad
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want_w else None
        total = hidden.new_zeros((), dtype=torch.float32)
        w = weight.to(hidden.dtype)
        for start in range(0, hidden.shape[0], chunk_rows):
            h = hidden[start : start + chunk_rows]
            t = targets[start : start + chunk_rows]
            valid = valid_all[start : start + chunk_rows]
            logits = matmul_t(h, w).float()  # (rows, vocab)
            scale = valid.float() / n_valid
            if kernels.supports(logits):  # one fused pass: row losses, and the logits become their grads
                total += kernels.softmax_cross_entropy_(logits, t.masked_fill(~valid, -1), scale).sum()
                probs = logits
            else:
                lse = torch.logsumexp(logits, dim=-1)
                picked = logits.gather(1, t.clamp_min(0)[:, None])[:, 0]
                total += ((lse - picked) * valid).sum()
                probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                probs[torch.arange(len(t), device=t.device), t.clamp_min(0)] -= 1.0
                probs.mul_(scale[:, None])  # d(mean loss)/d(logits)
            probs = probs.to(hidden.dtype)
            grad_hidden[start : start + chunk_rows] = matmul_t(probs, w.t())
            if want_w:
                grad_weight += matmul_t(probs.t().float(), h.float().t())
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total / n_valid

    @staticmethod
    @autocast_off
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        gw = grad_weight * grad_loss.float() if grad_weight is not None else None
        return grad_hidden * grad_loss.to(grad_hidden.dtype), gw, None, None


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, chunk_rows: int = 1024) -> Tensor:
    """Mean next-token loss of `hidden @ weight.T` (rows with target -100 ignored), without logits.

    hidden: (N, d), weight: (vocab, d), targets: (N,)."""
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, targets, chunk_rows)
    losses = [
        F.cross_entropy(
            matmul_t(hidden[s : s + chunk_rows], weight).float(), targets[s : s + chunk_rows], reduction="sum"
        )
        for s in range(0, hidden.shape[0], chunk_rows)
    ]
    return torch.stack(losses).sum() / (targets != -100).sum().clamp_min(1)
