"""State-space scans: the math of the Mamba mixers, free of any module state.

Two recurrences, each with a fast parallel form and a plain sequential reference:

* Mamba-2 / SSD (scalar decay per head):  h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T,  y_t = h_t C_t
  `ssd_chunked` is the block decomposition of the Mamba-2 paper written with batched matmuls:
  within a chunk the output is a masked (Q x Q) "attention" C B^T * decay applied to x; across
  chunks a tiny recurrence carries the (P x N) state. All FLOPs are in matmuls, so it runs at
  BLAS speed on a CPU, and memory is O(L * Q) instead of O(L * P * N).
* Mamba-1 / selective scan (decay per channel and state):  h_t = exp(dt_t A) * h_t-1 + dt_t B_t x_t
  `selective_scan_chunked` runs a log-depth (Hillis-Steele) scan inside chunks and carries the
  state between chunks; every step stays in linear space with decays in (0, 1], so it cannot
  overflow the way the exp(-cumsum) trick does.

The `*_reference` functions loop over time and exist as test oracles; they are never used to
train. Decays and cumulative sums are computed in fp32 whatever the input dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _segsum(a: Tensor) -> Tensor:
    """Stable segment sums: out[..., i, j] = a[..., j+1] + ... + a[..., i] for j <= i, else -inf."""
    t = a.shape[-1]
    a = a[..., None].expand(*a.shape, t)  # (..., T, T): a[..., i, j] = a_i
    strict_lower = torch.tril(torch.ones(t, t, dtype=torch.bool, device=a.device), diagonal=-1)
    a = a.masked_fill(~strict_lower, 0.0)
    out = torch.cumsum(a, dim=-2)
    lower = torch.tril(torch.ones(t, t, dtype=torch.bool, device=a.device))
    return out.masked_fill(~lower, float("-inf"))


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
    b, seqlen, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    q = chunk_size
    pad = (-seqlen) % q
    if pad:  # dt = 0 on padding: no decay and no input, so the final state is unchanged
        x, dt, B, C = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, dt, B, C))
    c = x.shape[1] // q
    in_dtype = x.dtype

    dt = dt.float()
    dA = (dt * A.float()).view(b, c, q, h).permute(0, 1, 3, 2)  # (b, c, h, q)
    cum = torch.cumsum(dA, dim=-1)  # (b, c, h, q)
    xdt = (x * dt.to(in_dtype)[..., None]).view(b, c, q, h, p).transpose(2, 3)  # (b, c, h, q, p)
    Bc = B.view(b, c, q, g, n).transpose(2, 3)  # (b, c, g, q, n)
    Cc = C.view(b, c, q, g, n).transpose(2, 3)  # (b, c, g, q, n)
    hg = h // g

    # 1. within chunks: y = (C B^T * decay) x, decay[t, s] = exp(cum_t - cum_s) for s <= t
    causal = torch.tril(torch.ones(q, q, dtype=torch.bool, device=x.device))
    decay = torch.exp((cum[..., :, None] - cum[..., None, :]).masked_fill(~causal, float("-inf")))
    CB = torch.matmul(Cc, Bc.transpose(-1, -2))  # (b, c, g, q, q), shared by the heads of a group
    scores = (decay.view(b, c, g, hg, q, q) * CB[:, :, :, None].float()).to(in_dtype)
    y = torch.matmul(scores.view(b, c, h, q, q), xdt)  # (b, c, h, q, p)

    # 2. state contributed by each chunk at its end: sum_s exp(cum_last - cum_s) xdt_s B_s^T
    to_end = torch.exp(cum[..., -1:] - cum).to(in_dtype)  # (b, c, h, q)
    weighted = (xdt * to_end[..., None]).transpose(-1, -2)  # (b, c, h, p, q)
    chunk_states = torch.matmul(weighted.reshape(b, c, g, hg, p, q), Bc[:, :, :, None])  # (b, c, g, hg, p, n)
    chunk_states = chunk_states.view(b, c, h, p, n)

    # 3. across chunks: state entering each chunk, via a (c+1) x (c+1) decay matmul
    if initial_state is None:
        initial_state = x.new_zeros(b, h, p, n)
    states = torch.cat([initial_state[:, None].to(in_dtype), chunk_states], dim=1)  # (b, c+1, h, p, n)
    chunk_decay = torch.exp(_segsum(F.pad(cum[..., -1], (0, 0, 1, 0)).transpose(1, 2)))  # (b, h, c+1, c+1)
    states = torch.matmul(chunk_decay.to(in_dtype), states.permute(0, 2, 1, 3, 4).reshape(b, h, c + 1, p * n))
    states = states.view(b, h, c + 1, p, n)
    entering, final_state = states[:, :, :-1], states[:, :, -1]  # (b, h, c, p, n), (b, h, p, n)

    # 4. contribution of the entering state: C_t (exp(cum_t) h_in)
    entering = entering.transpose(1, 2).reshape(b, c, g, hg, p, n)
    y_in = torch.matmul(Cc[:, :, :, None], entering.transpose(-1, -2)).view(b, c, h, q, p)
    y = y + y_in * torch.exp(cum).to(in_dtype)[..., None]

    y = y.transpose(2, 3).reshape(b, c * q, h, p)[:, :seqlen]
    return y, final_state


def ssd_step(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor) -> Tensor:
    """One recurrent SSD step, updating `state` (b, h, p, n) in place.

    x: (b, h, p), dt: (b, h), B, C: (b, g, n). Returns y (b, h, p).
    """
    b, h, p, n = state.shape
    g = B.shape[1]
    decay = torch.exp(dt.float() * A.float()).to(state.dtype)  # (b, h)
    Bh = B.repeat_interleave(h // g, dim=1) if g != h else B  # (b, h, n)
    Ch = C.repeat_interleave(h // g, dim=1) if g != h else C
    state.mul_(decay[..., None, None]).add_((x * dt[..., None].to(x.dtype))[..., None] * Bh[:, :, None, :])
    return torch.matmul(state, Ch[..., None].to(state.dtype)).squeeze(-1).to(x.dtype)  # (b, h, p)


def ssd_reference(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, initial_state: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Sequential SSD recurrence, one token at a time (test oracle)."""
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


def _scan_pairs(a: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    """Inclusive scan of h_t = a_t h_{t-1} + u_t along dim 1 (Hillis-Steele, log2(T) steps).

    Returns (prod of a up to t, h_t with h_{-1} = 0).
    """
    t = a.shape[1]
    step = 1
    while step < t:
        a_prev, u_prev = a[:, :-step], u[:, :-step]
        u = torch.cat([u[:, :step], u[:, step:] + a[:, step:] * u_prev], dim=1)
        a = torch.cat([a[:, :step], a[:, step:] * a_prev], dim=1)
        step *= 2
    return a, u


def selective_scan_chunked(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int,
    initial_state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Chunked Mamba-1 selective scan.

    x, dt: (b, l, d), A: (d, n) negative, B, C: (b, l, n), initial_state: (b, d, n) or None.
    Returns y (b, l, d) and the final state (b, d, n).
    """
    b, seqlen, d = x.shape
    n = A.shape[1]
    state = x.new_zeros(b, d, n) if initial_state is None else initial_state
    ys = []
    for start in range(0, seqlen, chunk_size):
        sl = slice(start, min(start + chunk_size, seqlen))
        dt_c = dt[:, sl].float()
        decay = torch.exp(dt_c[..., None] * A.float()).to(x.dtype)  # (b, q, d, n)
        inputs = (dt_c.to(x.dtype) * x[:, sl])[..., None] * B[:, sl, None, :]  # (b, q, d, n)
        decay_prod, h = _scan_pairs(decay, inputs)
        h = h + decay_prod * state[:, None]  # add the carried state, decayed to each step
        ys.append(torch.matmul(h, C[:, sl, :, None]).squeeze(-1))  # (b, q, d)
        state = h[:, -1]
    return torch.cat(ys, dim=1), state


def selective_scan_step(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor) -> Tensor:
    """One Mamba-1 step, updating `state` (b, d, n) in place. x, dt: (b, d); B, C: (b, n)."""
    decay = torch.exp(dt.float()[..., None] * A.float()).to(state.dtype)  # (b, d, n)
    state.mul_(decay).add_((dt * x)[..., None] * B[:, None, :])
    return torch.matmul(state, C[..., None]).squeeze(-1)  # (b, d)


def selective_scan_reference(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, initial_state: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Sequential Mamba-1 recurrence (test oracle)."""
    b, seqlen, d = x.shape
    state = x.new_zeros(b, d, A.shape[1]) if initial_state is None else initial_state.clone()
    ys = []
    for t in range(seqlen):
        state = torch.exp(dt[:, t, :, None] * A) * state + (dt[:, t] * x[:, t])[..., None] * B[:, t, None, :]
        ys.append(torch.einsum("bdn,bn->bd", state, C[:, t]))
    return torch.stack(ys, dim=1), state
