"""The chunked SSD scan (with its hand-written backward) equals the sequential reference."""

import pytest
import torch

from mamba_slm.model.ssd import safe_chunk_size, ssd_chunked, ssd_reference

pytestmark = pytest.mark.usefixtures("kernel_backend")


def _ssd_inputs(b=2, seqlen=40, h=4, p=8, g=2, n=16):
    x = torch.randn(b, seqlen, h, p)
    dt = torch.nn.functional.softplus(torch.randn(b, seqlen, h) - 1)
    A = -torch.rand(h) * 4 - 0.5
    B, C = torch.randn(b, seqlen, g, n), torch.randn(b, seqlen, g, n)
    return [t.requires_grad_() for t in (x, dt, A, B, C)]


def _grads(out, inputs):
    y, state = out
    loss = (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum() + state.square().sum() * 0.1
    return torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize("seqlen", [16, 40, 64, 1])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("batch", [2, 5])
def test_ssd_chunked_matches_reference(seqlen, with_state, batch):
    inputs = _ssd_inputs(b=batch, seqlen=seqlen)
    init = torch.randn(batch, 4, 8, 16, requires_grad=True) if with_state else None
    args = inputs + ([init] if init is not None else [])
    ref = ssd_reference(*inputs, initial_state=init)
    out = ssd_chunked(*inputs, chunk_size=16, initial_state=init)
    torch.testing.assert_close(out[0], ref[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out[1], ref[1], atol=1e-4, rtol=1e-4)
    for g_out, g_ref in zip(_grads(out, args), _grads(ref, args), strict=True):
        torch.testing.assert_close(g_out, g_ref, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("heads, groups", [(4, 4), (4, 1), (6, 3)])
def test_every_grouping_of_heads_matches_the_reference(heads, groups):
    """One head per group included: its layouts are transposed views unless copied."""
    inputs = _ssd_inputs(b=2, seqlen=37, h=heads, g=groups)
    ref = ssd_reference(*inputs)
    out = ssd_chunked(*inputs, chunk_size=8)
    torch.testing.assert_close(out[0], ref[0], atol=1e-4, rtol=1e-4)
    for g_out, g_ref in zip(_grads(out, inputs), _grads(ref, inputs), strict=True):
        torch.testing.assert_close(g_out, g_ref, atol=1e-3, rtol=1e-4)


def test_ssd_strong_decay_long_sequence_is_finite():
    """Large dt*A over many chunks must not overflow (decays are computed as segment sums)."""
    x, dt, A, B, C = (t.detach() for t in _ssd_inputs(seqlen=512))
    dt = dt * 20
    y, state = ssd_chunked(x, dt, A, B, C, chunk_size=64)
    ref, ref_state = ssd_reference(x, dt, A, B, C)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, ref, atol=1e-3, rtol=1e-3)


def test_strong_decay_halves_the_chunk_and_stays_exact():
    """Decays too steep for the factored within-chunk form make the scan use smaller chunks."""
    inputs = _ssd_inputs(seqlen=48)
    with torch.no_grad():
        inputs[1].mul_(40)  # dt * A of tens per token: far past the exponent range in 16 tokens
    x, dt, A, B, C = inputs
    assert safe_chunk_size(dt, A, 16) < 16
    assert safe_chunk_size(dt / 1000, A, 16) == 16
    out = ssd_chunked(*inputs, chunk_size=16)
    ref = ssd_reference(*inputs)
    assert torch.isfinite(out[0]).all()
    torch.testing.assert_close(out[0], ref[0], atol=1e-4, rtol=1e-4)
    for g_out, g_ref in zip(_grads(out, inputs), _grads(ref, inputs), strict=True):
        assert torch.isfinite(g_out).all()
        torch.testing.assert_close(g_out, g_ref, atol=1e-3, rtol=1e-4)
