"""Mamba-2's state-space dual (SSD) scan: chunked parallel form, recurrent step, reference.

    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T,    y_t = h_t C_t      (scalar decay per head)

`ssd_chunked` is the block decomposition of the Mamba-2 paper written as batched matmuls:
within a chunk of Q tokens the output is a masked (Q x Q) "attention" (C B^T * decay) applied
to dt*x; each chunk's state is one GEMM over all heads of a group (B and C are shared by them),
and a short loop over chunks carries the states (products of decays <= 1: no overflow, however
long the sequence). Heavy work is BLAS, and memory is O(L Q + L P N / Q), not O(L P N).

Why a hand-written backward: under plain autograd the scan keeps about fifteen (L x d_inner)
intermediates alive per layer, which made training use more memory than a transformer of the
same size. `_SSDFunction` saves only its inputs and recomputes the cheap intermediates in
backward (as mamba-ssm's fused kernels do), which also removes most of autograd's per-op
overhead. Tests check it against autograd through the sequential reference.
Decays and cumulative sums are always computed in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .fused import autocast_off


def _chunk(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, q: int):
    """Pad to a multiple of q (dt = 0 on padding: no decay, no input); views by chunk, token-major."""
    b, seqlen, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    pad = (-seqlen) % q
    if pad:
        x, dt, B, C = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, dt, B, C))
    c = x.shape[1] // q
    dtc = dt.float().reshape(b, c, q, h)
    cum = torch.cumsum(dtc * A.float(), dim=2)  # (b, c, q, h)
    xc = x.reshape(b, c, q, h, p)
    Bg = B.reshape(b, c, q, g, n).transpose(2, 3)  # (b, c, g, q, n)
    Cg = C.reshape(b, c, q, g, n).transpose(2, 3)
    return xc, dtc, Bg, Cg, cum


def _intermediates(xc, dtc, Bg, Cg, cum, h0):
    """Everything the output and the backward need, computed without autograd. States use the
    (g, n, hg*p) layout so that the state matmuls run once per group over all its heads (one
    large GEMM instead of h small ones)."""
    b, c, q, h, p = xc.shape
    g, n = Bg.shape[2], Bg.shape[4]
    hg, dtype = h // g, xc.dtype
    Xd = xc * dtc.to(dtype)[..., None]  # (b, c, q, h, p)
    cum_h = cum.transpose(2, 3)  # (b, c, h, q)
    causal = torch.tril(torch.ones(q, q, dtype=torch.bool, device=xc.device))
    Lm = (cum_h[..., :, None] - cum_h[..., None, :]).masked_fill_(~causal, float("-inf")).exp_().to(dtype)
    G = torch.matmul(Cg, Bg.transpose(-1, -2))  # (b, c, g, q, q)
    M = (Lm.view(b, c, g, hg, q, q) * G[:, :, :, None]).view(b, c, h, q, q)
    Xh = Xd.transpose(2, 3).contiguous()  # (b, c, h, q, p)

    w = torch.exp(cum[:, :, -1:] - cum).to(dtype)  # (b, c, q, h): decay from each token to chunk end
    Ug = (Xd * w[..., None]).view(b, c, q, g, hg * p).transpose(2, 3)  # (b, c, g, q, hg*p)
    ST = torch.matmul(Bg.transpose(-1, -2), Ug)  # (b, c, g, n, hg*p): each chunk's own state

    decay = torch.exp(cum[:, :, -1]).to(dtype).view(b, c, g, 1, hg, 1)  # whole-chunk decay per head
    states = torch.empty(b, c + 1, g, n, hg, p, dtype=dtype, device=xc.device)  # entering each chunk, final
    if h0 is None:
        states[:, 0].zero_()
    else:
        states[:, 0] = h0
    ST = ST.view(b, c, g, n, hg, p)
    for k in range(c):
        torch.addcmul(ST[:, k], states[:, k], decay[:, k], out=states[:, k + 1])
    state = states[:, c]
    Hin = states[:, :c].reshape(b, c, g, n, hg * p)
    Yo = torch.matmul(Cg, Hin).view(b, c, g, q, hg, p).transpose(2, 3).reshape(b, c, q, h, p)
    E = torch.exp(cum).to(dtype)  # (b, c, q, h)
    return state, (Xd, Lm, G, M, Xh, w, Ug, decay, Hin, E, Yo)


def _forward(xc, dtc, Bg, Cg, cum, h0):
    """y (b, c, q, h, p) and the final state (b, g, n, hg, p)."""
    final, (_, _, _, M, Xh, _, _, _, _, E, Yo) = _intermediates(xc, dtc, Bg, Cg, cum, h0)
    y = Yo.mul_(E[..., None])
    y += torch.matmul(M, Xh).transpose(2, 3)  # within-chunk part
    return y, final


def _backward(xc, dtc, Bg, Cg, cum, A, h0, dy, dfinal):
    b, c, q, h, p = xc.shape
    g, n = Bg.shape[2], Bg.shape[4]
    hg = h // g
    _, (Xd, Lm, G, M, Xh, w, Ug, decay, Hin, E, Yo) = _intermediates(xc, dtc, Bg, Cg, cum, h0)

    # y = Yo * E + Yd;  Yo = C Hin
    dcum = (dy * Yo).sum(-1).float().mul_(E)  # (b, c, q, h)
    del Yo
    dYo = (dy * E[..., None]).view(b, c, q, g, hg * p).transpose(2, 3)  # (b, c, g, q, hg*p)
    dC = torch.matmul(dYo, Hin.transpose(-1, -2))  # (b, c, g, q, n)
    dHin = torch.matmul(Cg.transpose(-1, -2), dYo).view(b, c, g, n, hg, p)
    del dYo

    # the chunk recurrence, backwards: state_{k+1} = decay_k * state_k + ST_k
    Hin6 = Hin.view(b, c, g, n, hg, p)
    grads = torch.empty(b, c + 1, g, n, hg, p, dtype=Hin.dtype, device=Hin.device)  # grads[k+1] = dST[k]
    grads[:, c] = dfinal
    for k in reversed(range(c)):
        torch.addcmul(dHin[:, k], grads[:, k + 1], decay[:, k], out=grads[:, k])
    dST = grads[:, 1:]
    ddecay = (dST * Hin6).sum((3, 5))  # (b, c, g, hg)
    dh0 = grads[:, 0] if h0 is not None else None
    dST = dST.reshape(b, c, g, n, hg * p)
    dcum_last = ddecay.view(b, c, h).float() * decay.view(b, c, h).float()

    # ST = B^T U,  U = Xd * w
    dU = torch.matmul(Bg, dST).view(b, c, g, q, hg, p).transpose(2, 3).reshape(b, c, q, h, p)
    dB = torch.matmul(Ug, dST.transpose(-1, -2))  # (b, c, g, q, n)
    dw = (dU * Xd).sum(-1).float().mul_(w)  # (b, c, q, h): grads of the exponent cum_last - cum
    dXd = dU.mul_(w[..., None])
    dcum_last += dw.sum(2)
    dcum -= dw

    # Yd = M Xh,  M = Lm * G,  G = C B^T
    dYd = dy.transpose(2, 3).contiguous()  # (b, c, h, q, p)
    dM = torch.matmul(dYd, Xh.transpose(-1, -2))  # (b, c, h, q, q)
    dXd += torch.matmul(M.transpose(-1, -2), dYd).transpose(2, 3)
    del dYd, M
    dM6 = dM.view(b, c, g, hg, q, q)
    dG = (dM6 * Lm.view(b, c, g, hg, q, q)).sum(3)  # (b, c, g, q, q)
    R = dM6.mul_(G[:, :, :, None]).view(b, c, h, q, q).float().mul_(Lm)
    dcum += (R.sum(-1) - R.sum(-2)).transpose(2, 3)
    dC += torch.matmul(dG, Bg)
    dB += torch.matmul(dG.transpose(-1, -2), Cg)

    # cum = cumsum(dt * A) over the chunk,  Xd = x * dt
    dcum[:, :, -1] += dcum_last
    ddA = dcum.flip(2).cumsum(2).flip(2)  # (b, c, q, h)
    ddt = ddA * A.float() + (dXd * xc).sum(-1).float()
    dA = (ddA * dtc).sum((0, 1, 2))
    dx = dXd.mul_(dtc.to(dXd.dtype)[..., None])
    return dx, ddt, dA, dB, dC, dh0


def _to_group_layout(state: Tensor, g: int) -> Tensor:
    """(b, h, p, n) -> (b, g, n, hg, p)."""
    b, h, p, n = state.shape
    return state.reshape(b, g, h // g, p, n).permute(0, 1, 4, 2, 3)


def _from_group_layout(state: Tensor) -> Tensor:
    """(b, g, n, hg, p) -> (b, h, p, n)."""
    b, g, n, hg, p = state.shape
    return state.permute(0, 1, 3, 4, 2).reshape(b, g * hg, p, n)


class _SSDFunction(torch.autograd.Function):
    @staticmethod
    @autocast_off
    def forward(ctx, x, dt, A, B, C, h0, chunk_size):
        seqlen, g = x.shape[1], B.shape[2]
        h0g = _to_group_layout(h0, g) if h0 is not None else None
        xc, dtc, Bg, Cg, cum = _chunk(x, dt, A, B, C, chunk_size)
        y, final = _forward(xc, dtc, Bg, Cg, cum, h0g)
        ctx.save_for_backward(x, dt, A, B, C, h0)
        ctx.chunk_size = chunk_size
        b, c, q, h, p = y.shape
        return y.view(b, c * q, h, p)[:, :seqlen], _from_group_layout(final)

    @staticmethod
    @autocast_off
    def backward(ctx, dy, dfinal):
        x, dt, A, B, C, h0 = ctx.saved_tensors
        b, seqlen, h, p = x.shape
        g, n = B.shape[2], B.shape[3]
        q = ctx.chunk_size
        h0g = _to_group_layout(h0, g) if h0 is not None else None
        xc, dtc, Bg, Cg, cum = _chunk(x, dt, A, B, C, q)
        c = xc.shape[1]
        dy = F.pad(dy, (0, 0, 0, 0, 0, c * q - seqlen)).view(b, c, q, h, p).to(x.dtype)
        dfinal = _to_group_layout(dfinal, g) if dfinal is not None else x.new_zeros(b, g, n, h // g, p)
        # Two rows at a time: the backward's temporaries are several (L x d_inner) tensors, and
        # slicing the batch bounds them without changing any result.
        parts = []
        for start in range(0, b, 2):
            r = slice(start, start + 2)
            parts.append(
                _backward(
                    xc[r],
                    dtc[r],
                    Bg[r],
                    Cg[r],
                    cum[r],
                    A,
                    h0g[r] if h0g is not None else None,
                    dy[r],
                    dfinal[r],
                )
            )
        dx, ddt, dB, dC = (torch.cat([part[i] for part in parts]) for i in (0, 1, 3, 4))
        dA = torch.stack([part[2] for part in parts]).sum(0)
        dh0 = torch.cat([part[5] for part in parts]) if h0g is not None else None
        dx = dx.reshape(b, c * q, h, p)[:, :seqlen]
        ddt = ddt.reshape(b, c * q, h)[:, :seqlen].to(dt.dtype)
        dB = dB.transpose(2, 3).reshape(b, c * q, g, n)[:, :seqlen]
        dC = dC.transpose(2, 3).reshape(b, c * q, g, n)[:, :seqlen]
        dh0 = _from_group_layout(dh0) if dh0 is not None else None
        return dx, ddt, dA.to(A.dtype), dB, dC, dh0, None


def ssd_chunked(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int,
    initial_state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Chunked SSD scan.

    x: (b, l, h, p), dt: (b, l, h) (after softplus), A: (h,) negative, B, C: (b, l, g, n),
    initial_state: (b, h, p, n) or None. Returns y (b, l, h, p) and the final state (b, h, p, n).
    """
    return _SSDFunction.apply(x, dt, A, B, C, initial_state, chunk_size)


def ssd_step(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor) -> Tensor:
    """One recurrent step, updating `state` (b, h, p, n) in place.

    x: (b, h, p), dt: (b, h), B, C: (b, g, n). Returns y (b, h, p). Heads are viewed as
    (g, h/g) so B and C broadcast over their group without being repeated, and the rank-1 update
    is one in-place addcmul: a decode step is a handful of ops and no state-sized temporaries.
    """
    b, h, p, n = state.shape
    g = B.shape[1]
    grouped = state.view(b, g, h // g, p, n)
    grouped.mul_(torch.exp(dt * A).to(state.dtype).view(b, g, h // g, 1, 1))
    xdt = (x * dt[..., None].to(x.dtype)).to(state.dtype)  # (b, h, p)
    grouped.addcmul_(xdt.view(b, g, h // g, p, 1), B.to(state.dtype).view(b, g, 1, 1, n))
    y = torch.matmul(grouped, C.to(state.dtype).view(b, g, 1, n, 1))  # (b, g, h/g, p, 1)
    return y.view(b, h, p).to(x.dtype)


def ssd_reference(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, initial_state: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Sequential recurrence, one token at a time (test oracle)."""
    b, seqlen, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    state = x.new_zeros(b, h, p, n) if initial_state is None else initial_state.clone()
    Bh = B.repeat_interleave(h // g, dim=2)  # (b, l, h, n)
    Ch = C.repeat_interleave(h // g, dim=2)
    ys = []
    for t in range(seqlen):
        decay = torch.exp(dt[:, t] * A)  # (b, h)
        state = (
            state * decay[..., None, None] + (dt[:, t, :, None] * x[:, t])[..., None] * Bh[:, t, :, None, :]
        )
        ys.append(torch.einsum("bhpn,bhn->bhp", state, Ch[:, t]))
    return torch.stack(ys, dim=1), state
