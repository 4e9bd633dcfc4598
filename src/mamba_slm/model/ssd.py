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

from .fused import autocast_off, rowdot

MAX_EXPONENT_RANGE = 80.0  # e^(80/2) = 2.4e17: products stay far below fp32's 3.4e38


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


def safe_chunk_size(dt: Tensor, A: Tensor, chunk_size: int) -> int:
    """The largest chunk size <= chunk_size (halving) whose within-chunk decay range stays under
    MAX_EXPONENT_RANGE, so that the factored exponentials of `_intermediates` stay finite. A
    chunk of one token has range 0, so this always ends; typical models keep the full size."""
    q = chunk_size
    while q > 1:
        b, seqlen, h = dt.shape
        dA = F.pad(dt.detach().float() * A.detach().float(), (0, 0, 0, (-seqlen) % q))
        cum = torch.cumsum(dA.view(b, -1, q, h), dim=2)
        if float((cum.amax(2) - cum.amin(2)).max()) <= MAX_EXPONENT_RANGE:
            break
        q //= 2
    return q


def _by_group(t: Tensor, g: int) -> Tensor:
    """(b, c, q, h, p) -> (b, c, g, q, hg*p): the heads of a group side by side (a view for g = 1)."""
    b, c, q, h, p = t.shape
    return t.reshape(b, c, q, g, (h // g) * p).transpose(2, 3)


def _by_head(t: Tensor, h: int) -> Tensor:
    """Inverse of `_by_group`, always contiguous: with one head per group (and g > 1) the reshape
    alone would return a transposed view, which the callers' `.view`s cannot take."""
    b, c, g, q, _ = t.shape
    return t.transpose(2, 3).reshape(b, c, q, h, -1).contiguous()


def _intermediates(xc, dtc, Bg, Cg, cum, h0, Hin=None):
    """Everything the output and the backward need, computed without autograd.

    Within a chunk, y_i = sum_{j<=i} (C_i . B_j) exp(cum_i - cum_j) dt_j x_j. The decay factors as
    exp(cum_i - m) * exp(m - cum_j) (m: the midpoint of the chunk's cum range, per head), so the
    masked matrix Gc = C B^T is shared by all heads of a group and the within-chunk output is one
    GEMM over all of them (Gc @ Xs) instead of one small (q x q) product and decay matrix per
    head. `safe_chunk_size` keeps both factors finite. States use the (g, n, hg*p) layout so that
    their matmuls also run once per group. Per-token scalars (b, c, q, h) are fp32. With `Hin`
    (the states entering each chunk, saved by the forward) the state recurrence is skipped and
    the final state is not returned."""
    b, c, q, h, p = xc.shape
    g, n = Bg.shape[2], Bg.shape[4]
    hg, dtype = h // g, xc.dtype
    mid = (cum.amax(2, keepdim=True) + cum.amin(2, keepdim=True)) / 2  # (b, c, 1, h)
    Ein, Fin = torch.exp(cum - mid), torch.exp(mid - cum)
    w = torch.exp(cum[:, :, -1:] - cum)  # decay from each token to the chunk's end
    Xs = xc * (dtc * Fin).to(dtype)[..., None]  # (b, c, q, h, p)
    Ug = _by_group(xc * (dtc * w).to(dtype)[..., None], g)  # (b, c, g, q, hg*p)
    causal = torch.tril(torch.ones(q, q, dtype=torch.bool, device=xc.device))
    Gc = torch.matmul(Cg, Bg.transpose(-1, -2)).masked_fill_(~causal, 0.0)  # (b, c, g, q, q)
    decay = torch.exp(cum[:, :, -1]).to(dtype).view(b, c, g, 1, hg, 1)  # whole-chunk decay per head
    final = None
    if Hin is None:
        ST = torch.matmul(Bg.transpose(-1, -2), Ug).view(b, c, g, n, hg, p)  # each chunk's own state
        # Hin[:, k]: the state entering chunk k (a buffer of its own, so its matmuls need no copy)
        Hin = torch.empty(b, c, g, n, hg, p, dtype=dtype, device=xc.device)
        if h0 is None:
            Hin[:, 0].zero_()
        else:
            Hin[:, 0] = h0
        for k in range(c - 1):
            torch.addcmul(ST[:, k], Hin[:, k], decay[:, k], out=Hin[:, k + 1])
        final = torch.addcmul(ST[:, c - 1], Hin[:, c - 1], decay[:, c - 1])
        Hin = Hin.view(b, c, g, n, hg * p)
    Yo = _by_head(torch.matmul(Cg, Hin), h)  # (b, c, q, h, p): the part from earlier chunks
    E = torch.exp(cum)  # (b, c, q, h)
    return final, (Ein, Fin, w, Xs, Gc, Ug, decay, Hin, E, Yo)


def _forward(xc, dtc, Bg, Cg, cum, h0):
    """y (b, c, q, h, p), the final state (b, g, n, hg, p) and the states entering each chunk."""
    h, g, dtype = xc.shape[3], Bg.shape[2], xc.dtype
    final, (Ein, _, _, Xs, Gc, _, _, Hin, E, Yo) = _intermediates(xc, dtc, Bg, Cg, cum, h0)
    y = Yo.mul_(E.to(dtype)[..., None])
    y.addcmul_(_by_head(torch.matmul(Gc, _by_group(Xs, g)), h), Ein.to(dtype)[..., None])  # within chunks
    return y, final, Hin


def _backward(xc, dtc, Bg, Cg, cum, A, h0, Hin, dy, dfinal, dx):
    """Gradients of `_forward`; dx (b, c, q, h, p) is written in place."""
    b, c, q, h, p = xc.shape
    g, n = Bg.shape[2], Bg.shape[4]
    hg, dtype = h // g, xc.dtype
    _, (Ein, Fin, w, Xs, Gc, Ug, decay, Hin, E, Yo) = _intermediates(xc, dtc, Bg, Cg, cum, h0, Hin)

    # y = Yo * E + T * Ein;  Yo = C Hin;  T = Gc Xs
    dcum = rowdot(dy, Yo).mul_(E)  # (b, c, q, h)
    del Yo
    dYo = _by_group(dy * E.to(dtype)[..., None], g)  # (b, c, g, q, hg*p)
    dC = torch.matmul(dYo, Hin.transpose(-1, -2))  # (b, c, g, q, n)
    dHin = torch.matmul(Cg.transpose(-1, -2), dYo).view(b, c, g, n, hg, p)
    del dYo

    # the chunk recurrence, backwards: state_{k+1} = decay_k * state_k + ST_k
    dST = torch.empty_like(dHin)  # dST[:, k]: gradient of the state leaving chunk k
    dST[:, c - 1] = dfinal
    for k in range(c - 1, 0, -1):
        torch.addcmul(dHin[:, k], dST[:, k], decay[:, k], out=dST[:, k - 1])
    dh0 = torch.addcmul(dHin[:, 0], dST[:, 0], decay[:, 0]) if h0 is not None else None
    ddecay = (dST * Hin.view(b, c, g, n, hg, p)).sum((3, 5))  # (b, c, g, hg)
    dST = dST.view(b, c, g, n, hg * p)
    dcum_last = ddecay.view(b, c, h).float() * decay.view(b, c, h).float()

    # ST = B^T U,  U = x dt w
    dU = _by_head(torch.matmul(Bg, dST), h)  # (b, c, q, h, p)
    dB = torch.matmul(Ug, dST.transpose(-1, -2))  # (b, c, g, q, n)
    dU_x = rowdot(dU, xc)
    dw = dU_x * dtc * w  # grads of the exponent cum_last - cum
    dcum_last += dw.sum(2)
    dcum -= dw

    # T = Gc Xs,  Xs = x dt Fin;  Ein = exp(cum - m), Fin = exp(m - cum) (y does not depend on m).
    # Token i's own term (Gc_ii dt_i x_i) does not depend on cum; leaving it out of the two dcum
    # sums (strictly lower Gs) avoids cancelling it against itself in fp32 when decays are steep.
    Xg = _by_group(Xs, g)
    causal = torch.tril(torch.ones(q, q, dtype=torch.bool, device=xc.device))
    Gs = Gc.masked_fill(~torch.tril(causal, diagonal=-1), 0.0)
    dcum += rowdot(dy, _by_head(torch.matmul(Gs, Xg), h)).mul_(Ein)
    dT = dy * Ein.to(dtype)[..., None]  # (b, c, q, h, p)
    dTg = _by_group(dT, g)
    dGc = torch.matmul(dTg, Xg.transpose(-1, -2)).masked_fill_(~causal, 0.0)  # (b, c, g, q, q)
    dXs = _by_head(torch.matmul(Gs.transpose(-1, -2), dTg), h)  # (b, c, q, h, p), own terms excluded
    dcum -= rowdot(dXs, xc).mul_(dtc * Fin)
    own = Gc.diagonal(dim1=-2, dim2=-1).transpose(2, 3)  # (b, c, q, g): C_i . B_i
    dXs.view(b, c, q, g, hg, p).addcmul_(dT.view(b, c, q, g, hg, p), own[..., None, None])
    del dT, dTg
    dXs_x = rowdot(dXs, xc)
    dC += torch.matmul(dGc, Bg)
    dB += torch.matmul(dGc.transpose(-1, -2), Cg)

    # cum = cumsum(dt * A) over the chunk; x enters through U and Xs
    dcum[:, :, -1] += dcum_last
    ddA = dcum.flip(2).cumsum(2).flip(2)  # (b, c, q, h)
    ddt = ddA * A.float() + dU_x * w + dXs_x * Fin
    dA = (ddA * dtc).sum((0, 1, 2))
    torch.mul(dU, (dtc * w).to(dtype)[..., None], out=dx)
    dx.addcmul_(dXs, (dtc * Fin).to(dtype)[..., None])
    return ddt, dA, dB, dC, dh0


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
        chunk_size = safe_chunk_size(dt, A, chunk_size)
        xc, dtc, Bg, Cg, cum = _chunk(x, dt, A, B, C, chunk_size)
        y, final, Hin = _forward(xc, dtc, Bg, Cg, cum, h0g)
        # The chunk states (b, L/q, n, d_inner) are a small fraction of the layer's activations;
        # keeping them spares the backward their matmul and recurrence.
        ctx.save_for_backward(x, dt, A, B, C, h0, Hin)
        ctx.chunk_size = chunk_size
        b, c, q, h, p = y.shape
        return y.view(b, c * q, h, p)[:, :seqlen], _from_group_layout(final)

    @staticmethod
    @autocast_off
    def backward(ctx, dy, dfinal):
        x, dt, A, B, C, h0, Hin = ctx.saved_tensors
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
        dx = torch.empty_like(xc)
        parts = []
        for start in range(0, b, 2):
            r = slice(start, start + 2)
            h0r = h0g[r] if h0g is not None else None
            parts.append(
                _backward(xc[r], dtc[r], Bg[r], Cg[r], cum[r], A, h0r, Hin[r], dy[r], dfinal[r], dx[r])
            )
        ddt, dB, dC = (torch.cat([part[i] for part in parts]) for i in (0, 2, 3))
        dA = torch.stack([part[1] for part in parts]).sum(0)
        dh0 = torch.cat([part[4] for part in parts]) if h0g is not None else None
        dx = dx.view(b, c * q, h, p)[:, :seqlen]
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
