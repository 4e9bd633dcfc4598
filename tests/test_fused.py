"""The hand-written backward passes (C kernels and PyTorch fallback) equal autograd through the plain ops."""

import pytest
import torch
import torch.nn.functional as F

from mamba_slm.model.fused import conv_silu, gated_rms_norm, linear_cross_entropy, rms_norm, rowdot, swiglu

pytestmark = pytest.mark.usefixtures("kernel_backend")


def _plain_conv_silu(x, weight, bias):
    k = weight.shape[1]
    out = F.conv1d(x.transpose(1, 2), weight[:, None], bias, padding=k - 1, groups=x.shape[2])
    return F.silu(out[..., : x.shape[1]].transpose(1, 2))


def _compare(fn, ref, inputs):
    out = fn(*inputs)
    expected = ref(*inputs)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, [t for t in inputs if isinstance(t, torch.Tensor)], dout)
    ref_grads = torch.autograd.grad(expected, [t for t in inputs if isinstance(t, torch.Tensor)], dout)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("seqlen", [1, 3, 17])
def test_conv_silu_matches_conv1d(seqlen):
    x = torch.randn(2, seqlen, 6, requires_grad=True)
    weight = torch.randn(6, 4, requires_grad=True)
    bias = torch.randn(6, requires_grad=True)
    _compare(conv_silu, _plain_conv_silu, [x, weight, bias])


@pytest.mark.parametrize("n_groups", [1, 2])
def test_gated_rms_norm_matches_autograd(n_groups):
    y = torch.randn(2, 5, 8, requires_grad=True)
    z = torch.randn(2, 5, 8, requires_grad=True)
    weight = torch.rand(8, requires_grad=True) + 0.5

    def ref(y, z, weight):
        u = (y * F.silu(z)).view(2, 5, n_groups, -1)
        u = u * torch.rsqrt(u.square().mean(-1, keepdim=True) + 1e-5)
        return u.view(2, 5, 8) * weight

    _compare(lambda y, z, w: gated_rms_norm(y, z, w, n_groups, 1e-5), ref, [y, z, weight])


def test_swiglu_matches_autograd():
    gate = torch.randn(3, 7, 10, requires_grad=True)
    up = torch.randn(3, 7, 10, requires_grad=True)
    _compare(swiglu, lambda g, u: F.silu(g) * u, [gate, up])


def test_rms_norm_matches_autograd():
    x = torch.randn(3, 7, 24, requires_grad=True)
    weight = torch.randn(24, requires_grad=True)
    _compare(lambda x, w: rms_norm(x, w, 1e-5), lambda x, w: F.rms_norm(x, (24,), w, 1e-5), [x, weight])


def test_rowdot_equals_product_sum():
    a, b = torch.randn(4, 5, 64), torch.randn(4, 5, 64)
    torch.testing.assert_close(rowdot(a, b), (a * b).sum(-1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk_rows", [3, 64])
def test_linear_cross_entropy_matches_unfused(chunk_rows):
    hidden = torch.randn(10, 8, requires_grad=True)
    weight = torch.randn(20, 8, requires_grad=True)
    targets = torch.randint(0, 20, (10,))
    targets[[2, 7]] = -100
    loss = linear_cross_entropy(hidden, weight, targets, chunk_rows)
    expected = F.cross_entropy(hidden @ weight.t(), targets, ignore_index=-100)
    torch.testing.assert_close(loss, expected)
    grads = torch.autograd.grad(loss * 3, [hidden, weight])
    ref = torch.autograd.grad(expected * 3, [hidden, weight])
    for got, want in zip(grads, ref, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, targets, chunk_rows), expected)
