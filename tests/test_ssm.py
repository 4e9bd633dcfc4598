"""Mamba mixers: the CUDA-kernel glue gives the same result as the PyTorch path."""

import torch
import torch.nn.functional as F

from mamba_slm import ModelConfig
from mamba_slm.model import ssm
from mamba_slm.model.ssd import ssd_chunked


def _fake_causal_conv1d_fn(x, weight, bias=None, activation=None):
    """causal_conv1d's contract: x (b, d, l), weight (d, w) -> (b, d, l)."""
    out = F.conv1d(x, weight[:, None], bias, padding=weight.shape[1] - 1, groups=x.shape[1])[
        ..., : x.shape[2]
    ]
    return F.silu(out) if activation == "silu" else out


def _fake_chunk_scan(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, dt_softplus=False):
    """mamba_ssm's mamba_chunk_scan_combined contract, on our own scan."""
    if dt_bias is not None:
        dt = dt + dt_bias
    if dt_softplus:
        dt = F.softplus(dt)
    y, _ = ssd_chunked(x, dt, A, B, C, chunk_size)
    return y + x * D[:, None] if D is not None else y


def test_kernel_path_matches_pytorch_path(monkeypatch):
    mixer = ssm.Mamba2Mixer(ModelConfig.from_preset("tiny", n_groups=2), layer_idx=0)
    hidden = torch.randn(2, 37, 64, requires_grad=True)
    plain = mixer(hidden)
    (g_plain,) = torch.autograd.grad(plain.sum(), hidden)
    monkeypatch.setattr(ssm, "kernels_for", lambda *args: (_fake_causal_conv1d_fn, _fake_chunk_scan))
    fused = mixer(hidden)
    (g_fused,) = torch.autograd.grad(fused.sum(), hidden)
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_fused, g_plain, atol=1e-5, rtol=1e-5)


def test_kernels_are_not_used_on_cpu_or_with_a_cache():
    hidden = torch.randn(1, 4, 8)
    assert ssm.kernels_for(hidden, None, None) is None
