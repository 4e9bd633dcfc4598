"""The chunked Mamba-1 selective scan equals the sequential reference, values and gradients."""

import pytest
import torch

from mamba_slm.model.selective_scan import selective_scan_chunked, selective_scan_reference


def _grads(out, inputs):
    y, state = out
    loss = (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum() + state.square().sum() * 0.1
    return torch.autograd.grad(loss, inputs)


def _mamba1_inputs(b=2, seqlen=40, d=12, n=8):
    x = torch.randn(b, seqlen, d)
    dt = torch.nn.functional.softplus(torch.randn(b, seqlen, d) - 1)
    A = -torch.rand(d, n) * 4 - 0.5
    B, C = torch.randn(b, seqlen, n), torch.randn(b, seqlen, n)
    return [t.requires_grad_() for t in (x, dt, A, B, C)]


@pytest.mark.parametrize("seqlen", [16, 37, 1])
@pytest.mark.parametrize("with_state", [False, True])
def test_selective_scan_chunked_matches_reference(seqlen, with_state):
    inputs = _mamba1_inputs(seqlen=seqlen)
    init = torch.randn(2, 12, 8, requires_grad=True) if with_state else None
    args = inputs + ([init] if init is not None else [])
    ref = selective_scan_reference(*inputs, initial_state=init)
    out = selective_scan_chunked(*inputs, chunk_size=8, initial_state=init)
    torch.testing.assert_close(out[0], ref[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out[1], ref[1], atol=1e-4, rtol=1e-4)
    for g_out, g_ref in zip(_grads(out, args), _grads(ref, args), strict=True):
        torch.testing.assert_close(g_out, g_ref, atol=1e-3, rtol=1e-4)
