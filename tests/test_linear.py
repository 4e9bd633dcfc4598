"""Linear: the oneDNN product for batches (forward and backward) and its fallback to F.linear."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from mamba_slm.model import linear
from mamba_slm.model.linear import Linear, matmul_t

NEEDS_ONEDNN = pytest.mark.skipif(
    not linear._ONEDNN, reason="oneDNN is used on x86-64 builds of PyTorch only"
)


def _grads(layer: Linear, x: torch.Tensor, forward) -> tuple[torch.Tensor, ...]:
    x = x.detach().requires_grad_(True)
    layer.zero_grad()
    y = forward(x)
    (y * torch.linspace(-1, 1, y.shape[-1])).square().sum().backward()
    return y.detach(), x.grad, layer.weight.grad.clone(), layer.bias.grad.clone()


@pytest.mark.parametrize("onednn", [pytest.param(True, marks=NEEDS_ONEDNN), False])
def test_batched_forward_and_gradients_match_f_linear(onednn, monkeypatch):
    monkeypatch.setattr(linear, "_ONEDNN", onednn)
    calls = []
    real = linear.matmul_t
    monkeypatch.setattr(linear, "matmul_t", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    layer = Linear(96, 40)
    x = torch.randn(3, 20, 96)  # 60 rows: a batch, not decode rows
    ours = _grads(layer, x, layer)
    want = _grads(layer, x, lambda t: F.linear(t, layer.weight, layer.bias))
    for got, ref in zip(ours, want, strict=True):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert len(calls) == (3 if onednn else 0)  # forward, grad of the input, grad of the weight


@NEEDS_ONEDNN
def test_a_frozen_weight_gets_no_gradient_and_the_input_still_does():
    layer = Linear(32, 24, bias=False).requires_grad_(False)  # as under a LoRA adapter
    x = torch.randn(40, 32, requires_grad=True)
    layer(x).sum().backward()
    assert layer.weight.grad is None
    torch.testing.assert_close(x.grad, layer.weight.sum(0).expand(40, -1), atol=1e-5, rtol=1e-5)


@NEEDS_ONEDNN
def test_matmul_t_reads_transposed_views_in_place():
    torch.manual_seed(1)
    a, b = torch.randn(70, 33), torch.randn(50, 70)
    torch.testing.assert_close(matmul_t(a.t(), b), a.t() @ b.t(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(matmul_t(b, a.t()), b @ a, atol=1e-5, rtol=1e-5)


@NEEDS_ONEDNN
def test_onednn_can_be_switched_off_with_torch_backends(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda *a: calls.append(1))
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    layer, x = Linear(16, 8), torch.randn(30, 16)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
    assert not calls


def test_a_shape_error_reads_as_f_linears():
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        matmul_t(torch.randn(20, 7), torch.randn(5, 6))


def test_tracing_records_a_plain_linear_for_exporters():
    layer, x = Linear(32, 16), torch.randn(40, 32)
    graph = str(torch.jit.trace(layer, x).graph)
    assert "aten::linear" in graph and "mkldnn" not in graph


@NEEDS_ONEDNN
def test_products_of_ever_new_shapes_do_not_grow_memory_without_bound():
    """oneDNN caches a primitive per shape; ours are capped (a server sees prompts of any length)."""
    script = """
import torch
from mamba_slm.model.linear import matmul_t
def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
w = torch.randn(1024, 256)
for rows in range(18, 218):  # warm-up: the allocator and the first primitives
    matmul_t(torch.randn(rows, 256), w)
before = rss_mb()
for rows in range(218, 1018):
    matmul_t(torch.randn(rows, 256), w)
print(rss_mb() - before)
"""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")
    }
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    assert float(out.stdout.split()[-1]) < 100  # uncapped: ~400 MB more
