"""Mamba mixers: Mamba-2 (SSD, the default) and Mamba-1 (selective scan).

Each mixer has the three paths of state-spaces/mamba side by side:
  * `forward` on a whole sequence: the chunked parallel scan (`ssd.py`, `selective_scan.py`), optionally starting
    from a cached state (a prefill continues where the cache left off) and writing the final
    conv and SSM state back to it;
  * `step` on one token: the recurrence, updating the cached state in place;
  * `scan_impl = "reference"` swaps in the sequential scan, the oracle the tests compare with.
Parameters follow mamba-ssm / HF Bamba (Mamba-2) and mamba-ssm / HF Jamba (Mamba-1) names, and
every projection is called as a module, so a LoRA adapter on it is never bypassed.

Padding: positions where `mask` is 0 get a zero conv input and dt = 0 (no decay, no input), so
left padding never enters the conv or SSM state. On CUDA, when mamba_ssm and causal_conv1d are
installed, the training path (no cache, no mask) uses their fused kernels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ModelConfig
from . import kernels
from .cache import MambaState
from .fused import conv_silu, gated_rms_norm
from .linear import Linear
from .selective_scan import selective_scan_chunked, selective_scan_reference, selective_scan_step
from .ssd import ssd_chunked, ssd_reference, ssd_step

_KERNELS: tuple | None | bool = False  # False: not looked up yet


def cuda_kernels():
    """(causal_conv1d_fn, mamba_chunk_scan_combined) when mamba_ssm and causal_conv1d are installed."""
    global _KERNELS
    if _KERNELS is False:
        try:
            from causal_conv1d import causal_conv1d_fn
            from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

            _KERNELS = (causal_conv1d_fn, mamba_chunk_scan_combined)
        except ImportError:
            _KERNELS = None
    return _KERNELS


def kernels_for(hidden: Tensor, state: MambaState | None, mask: Tensor | None):
    """The fused CUDA kernels cover the training path only: CUDA, no cache, no padding."""
    return cuda_kernels() if hidden.is_cuda and state is None and mask is None else None


def causal_conv_silu(x: Tensor, conv: nn.Conv1d, state: MambaState | None) -> Tensor:
    """silu(depthwise causal conv over time). x: (b, l, c) -> (b, l, c).

    With a cached state, its window is the conv's input before x and the state advances to the
    last k-1 inputs.
    """
    weight = conv.weight[:, 0].to(x.dtype)  # (c, k)
    bias = conv.bias.to(x.dtype) if conv.bias is not None else None
    if state is None:
        return conv_silu(x, weight, bias)
    prev = state.conv.to(x.dtype)
    out = conv_silu(x, weight, bias, prev)
    state.conv = torch.cat([prev, x], dim=1)[:, x.shape[1] :].to(state.conv.dtype).clone()  # last k-1
    return out


def causal_conv_step(x: Tensor, conv: nn.Conv1d, state: MambaState) -> Tensor:
    """One conv step. x: (b, c); shifts the cached window in place."""
    window = torch.cat([state.conv, x[:, None].to(state.conv.dtype)], dim=1)  # (b, k, c)
    out = (window * conv.weight[:, 0].t().to(window.dtype)).sum(1)  # (b, c)
    if conv.bias is not None:
        out += conv.bias
    state.conv.copy_(window[:, 1:])
    return out.to(x.dtype)


def inverse_softplus_dt(n: int, dt_min: float, dt_max: float) -> Tensor:
    """Bias such that softplus(bias) is log-uniform in [dt_min, dt_max] (Mamba's dt init)."""
    dt = torch.exp(torch.rand(n) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = dt.clamp_min(1e-4)
    return dt + torch.log(-torch.expm1(-dt))


class GatedRMSNorm(nn.Module):
    """RMSNorm(y * silu(z)) * weight, normalised per group (Mamba-2's norm before out_proj)."""

    def __init__(self, dim: int, n_groups: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.n_groups, self.eps = n_groups, eps

    def forward(self, y: Tensor, z: Tensor) -> Tensor:
        return gated_rms_norm(y, z, self.weight, self.n_groups, self.eps)


class Mamba2Mixer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        c = config
        self.layer_idx = layer_idx
        self.d_inner, self.n_heads, self.head_dim = c.d_inner, c.n_ssm_heads, c.head_dim
        self.n_groups, self.d_state, self.chunk_size = c.n_groups, c.d_state, c.chunk_size
        self.conv_dim = c.d_inner + 2 * c.n_groups * c.d_state
        self.dt_min, self.dt_max = c.dt_min, c.dt_max
        self.scan_impl = "chunked"
        self.in_proj = Linear(c.d_model, c.d_inner + self.conv_dim + self.n_heads, bias=False)
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, c.d_conv, groups=self.conv_dim, padding=c.d_conv - 1
        )
        self.dt_bias = nn.Parameter(torch.zeros(self.n_heads))
        self.A_log = nn.Parameter(torch.zeros(self.n_heads))
        self.D = nn.Parameter(torch.ones(self.n_heads))
        self.norm = GatedRMSNorm(c.d_inner, c.n_groups, c.norm_eps)
        self.out_proj = Linear(c.d_inner, c.d_model, bias=False)
        self.init_ssm_parameters()

    @torch.no_grad()
    def init_ssm_parameters(self) -> None:
        self.dt_bias.copy_(inverse_softplus_dt(self.n_heads, self.dt_min, self.dt_max))
        self.A_log.copy_(torch.log(torch.empty(self.n_heads).uniform_(1, 16)))
        self.D.fill_(1.0)

    def _split(self, zxbcdt: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return torch.split(zxbcdt, [self.d_inner, self.conv_dim, self.n_heads], dim=-1)

    def forward(self, hidden: Tensor, mask: Tensor | None = None, state: MambaState | None = None) -> Tensor:
        """hidden: (b, l, d_model); mask: (b, l) bool or None; state: cached state or None."""
        if state is not None and hidden.shape[1] == 1 and mask is None:
            return self.step(hidden, state)
        b, seqlen, _ = hidden.shape
        z, xBC, dt = self._split(self.in_proj(hidden))  # (b, l, d_inner), (b, l, conv_dim), (b, l, h)
        A = -torch.exp(self.A_log.float())  # (h,)
        kernels = kernels_for(hidden, state, mask)
        if kernels is not None and self.scan_impl == "chunked":
            return self._forward_cuda(z, xBC, dt, A, kernels)
        if mask is not None:
            xBC = xBC * mask[..., None].to(xBC.dtype)
        xBC = causal_conv_silu(xBC, self.conv1d, state)
        if mask is not None:
            xBC = xBC * mask[..., None].to(xBC.dtype)
        x, B, C = torch.split(
            xBC, [self.d_inner, self.n_groups * self.d_state, self.n_groups * self.d_state], -1
        )
        dt = F.softplus(dt + self.dt_bias)  # (b, l, h)
        if mask is not None:
            dt = dt * mask[..., None].to(dt.dtype)
        x = x.reshape(b, seqlen, self.n_heads, self.head_dim)  # (b, l, h, p)
        B = B.reshape(b, seqlen, self.n_groups, self.d_state)  # (b, l, g, n)
        C = C.reshape(b, seqlen, self.n_groups, self.d_state)
        initial = state.ssm if state is not None else None
        if self.scan_impl == "reference":
            y, final = ssd_reference(x, dt, A, B, C, initial)
        else:
            y, final = ssd_chunked(x, dt, A, B, C, self.chunk_size, initial)
        if state is not None:
            state.ssm.copy_(final)  # into the contiguous buffer: the step updates it in place
        y = torch.addcmul(y, x, self.D[:, None].to(x.dtype))
        y = self.norm(y.reshape(b, seqlen, self.d_inner), z)
        return self.out_proj(y)

    def _forward_cuda(self, z: Tensor, xBC: Tensor, dt: Tensor, A: Tensor, kernels) -> Tensor:
        causal_conv1d_fn, chunk_scan = kernels
        b, seqlen, _ = xBC.shape
        xBC = causal_conv1d_fn(
            xBC.transpose(1, 2), self.conv1d.weight[:, 0], self.conv1d.bias, activation="silu"
        ).transpose(1, 2)
        x, B, C = torch.split(
            xBC, [self.d_inner, self.n_groups * self.d_state, self.n_groups * self.d_state], -1
        )
        y = chunk_scan(
            x.reshape(b, seqlen, self.n_heads, self.head_dim),
            dt,
            A,
            B.reshape(b, seqlen, self.n_groups, self.d_state),
            C.reshape(b, seqlen, self.n_groups, self.d_state),
            self.chunk_size,
            D=self.D,
            dt_bias=self.dt_bias,
            dt_softplus=True,
        )
        return self.out_proj(self.norm(y.reshape(b, seqlen, self.d_inner), z))

    def _fused_step_ok(self, zxbcdt: Tensor, state: MambaState) -> bool:
        """Whether kernels.mamba2_step can take this step: fp32 on a CPU, contiguous states and
        parameters, no autograd, not inside torch.compile. It runs per step, so the parameter
        checks are made once per cached state (one generation)."""
        if torch.compiler.is_compiling() or torch.is_grad_enabled() or kernels.library() is None:
            return False
        tensors = (zxbcdt, state.conv, state.ssm)
        if not (
            zxbcdt.device.type == "cpu"
            and zxbcdt.stride(-1) == 1
            and all(t.dtype is torch.float32 for t in tensors)
            and state.conv.is_contiguous()
            and state.ssm.is_contiguous()
        ):
            return False
        if state.fused_step is None:
            params = (
                self.conv1d.weight,
                self.conv1d.bias,
                self.dt_bias,
                self.A_log,
                self.D,
                self.norm.weight,
            )
            present = [p for p in params if p is not None]
            state.fused_step = all(p.dtype is torch.float32 and p.is_contiguous() for p in present)
        return state.fused_step

    def step(self, hidden: Tensor, state: MambaState) -> Tensor:
        """hidden: (b, 1, d_model) -> (b, 1, d_model), advancing `state` by one token."""
        b = hidden.shape[0]
        zxbcdt = self.in_proj(hidden[:, 0])
        if self._fused_step_ok(zxbcdt, state):
            return self.out_proj(kernels.mamba2_step(self, zxbcdt, state.conv, state.ssm)[:, None])
        z, xBC, dt = self._split(zxbcdt)
        xBC = F.silu(causal_conv_step(xBC, self.conv1d, state))
        x, B, C = torch.split(
            xBC, [self.d_inner, self.n_groups * self.d_state, self.n_groups * self.d_state], -1
        )
        dt = F.softplus(dt + self.dt_bias)  # (b, h)
        x = x.reshape(b, self.n_heads, self.head_dim)
        A = -torch.exp(self.A_log.float())
        B = B.reshape(b, self.n_groups, self.d_state)
        C = C.reshape(b, self.n_groups, self.d_state)
        y = ssd_step(state.ssm, x, dt, A, B, C)  # (b, h, p)
        y = y + x * self.D[:, None].to(x.dtype)
        y = self.norm(y.reshape(b, 1, self.d_inner), z[:, None])
        return self.out_proj(y)


class Mamba1Mixer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        c = config
        self.layer_idx = layer_idx
        self.d_inner, self.d_state, self.dt_rank, self.chunk_size = (
            c.d_inner,
            c.d_state,
            c.dt_rank,
            c.chunk_size,
        )
        self.dt_min, self.dt_max = c.dt_min, c.dt_max
        self.scan_impl = "chunked"
        self.in_proj = Linear(c.d_model, 2 * c.d_inner, bias=False)
        self.conv1d = nn.Conv1d(c.d_inner, c.d_inner, c.d_conv, groups=c.d_inner, padding=c.d_conv - 1)
        self.x_proj = Linear(c.d_inner, c.dt_rank + 2 * c.d_state, bias=False)
        self.dt_proj = Linear(c.dt_rank, c.d_inner, bias=True)
        self.A_log = nn.Parameter(torch.zeros(c.d_inner, c.d_state))
        self.D = nn.Parameter(torch.ones(c.d_inner))
        self.out_proj = Linear(c.d_inner, c.d_model, bias=False)
        self.init_ssm_parameters()

    @torch.no_grad()
    def init_ssm_parameters(self) -> None:
        bound = self.dt_rank**-0.5
        self.dt_proj.weight.uniform_(-bound, bound)
        self.dt_proj.bias.copy_(inverse_softplus_dt(self.d_inner, self.dt_min, self.dt_max))
        self.A_log.copy_(
            torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32)).expand_as(self.A_log)
        )
        self.D.fill_(1.0)

    def _ssm_inputs(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        dt, B, C = torch.split(self.x_proj(x), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        return F.softplus(self.dt_proj(dt)), B, C

    def forward(self, hidden: Tensor, mask: Tensor | None = None, state: MambaState | None = None) -> Tensor:
        if state is not None and hidden.shape[1] == 1 and mask is None:
            return self.step(hidden, state)
        x, z = self.in_proj(hidden).chunk(2, dim=-1)  # (b, l, d_inner) each
        if mask is not None:
            x = x * mask[..., None].to(x.dtype)
        x = causal_conv_silu(x, self.conv1d, state)
        if mask is not None:
            x = x * mask[..., None].to(x.dtype)
        dt, B, C = self._ssm_inputs(x)  # (b, l, d_inner), (b, l, n), (b, l, n)
        if mask is not None:
            dt = dt * mask[..., None].to(dt.dtype)
        A = -torch.exp(self.A_log.float())  # (d_inner, n)
        initial = state.ssm if state is not None else None
        if self.scan_impl == "reference":
            y, final = selective_scan_reference(x, dt, A, B, C, initial)
        else:
            y, final = selective_scan_chunked(x, dt, A, B, C, self.chunk_size, initial)
        if state is not None:
            state.ssm.copy_(final)  # into the contiguous buffer: the step updates it in place
        y = (y + x * self.D.to(x.dtype)) * F.silu(z)
        return self.out_proj(y)

    def step(self, hidden: Tensor, state: MambaState) -> Tensor:
        x, z = self.in_proj(hidden[:, 0]).chunk(2, dim=-1)  # (b, d_inner)
        x = F.silu(causal_conv_step(x, self.conv1d, state))
        dt, B, C = self._ssm_inputs(x)
        y = selective_scan_step(state.ssm, x, dt, -torch.exp(self.A_log.float()), B, C)
        y = (y + x * self.D.to(x.dtype)) * F.silu(z)
        return self.out_proj(y)[:, None]
