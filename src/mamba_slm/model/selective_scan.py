"""Mamba-1's selective scan: chunked parallel form, recurrent step, reference.

    h_t = exp(dt_t A) * h_{t-1} + dt_t B_t x_t,    y_t = h_t C_t     (decay per channel and state)

The decay differs per (channel, state), so the scan cannot be written as matmuls the way SSD's
can. `selective_scan_chunked` runs a log-depth (Hillis-Steele) scan inside chunks and carries
the state between chunks; every step stays in linear space with decays in (0, 1], so it cannot
overflow the way the exp(-cumsum) trick does. `selective_scan_reference` loops over time and is
the test oracle. Decays are computed in fp32 whatever the input dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor


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
