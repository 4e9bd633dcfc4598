"""The compiled CPU kernels: same results as the PyTorch ops on the layouts the model passes
them, deterministic, and a clean fallback when they cannot be built."""

import pytest
import torch
import torch.nn.functional as F

from conftest import NEEDS_C_COMPILER
from mamba_slm.model import kernels
from mamba_slm.model.fused import _conv, _gated_rms_norm

pytestmark = NEEDS_C_COMPILER


def test_library_builds_and_loads():
    assert kernels.library() is not None
    assert list(kernels.cache_dir().glob("kernels-*.so"))


def test_conv_reads_split_columns_and_cached_window():
    torch.manual_seed(0)
    wide = torch.randn(3, 9, 20)
    x = wide[..., 4:15]  # a split of a wider projection: row stride 20
    weight, bias = torch.randn(11, 4), torch.randn(11)
    prev = torch.randn(3, 3, 11)
    assert not x.is_contiguous()
    got = kernels.conv_silu_forward(x, weight, bias, prev)
    want = F.silu(_conv(x, weight, bias, torch.cat([prev, x], dim=1)))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    # without a window the inputs before t=0 are zeros; shorter than the kernel too
    short = x[:, :2]
    torch.testing.assert_close(
        kernels.conv_silu_forward(short, weight, None), F.silu(_conv(short, weight, None))
    )


def test_conv_backward_matches_autograd_on_strided_input():
    torch.manual_seed(1)
    wide = torch.randn(2, 13, 24, requires_grad=True)
    x = wide[..., 3:19]
    weight, bias = torch.randn(16, 4, requires_grad=True), torch.randn(16, requires_grad=True)
    dout = torch.randn(2, 13, 16)
    want = torch.autograd.grad(F.silu(_conv(x, weight, bias)), (x, weight, bias), dout)
    got = kernels.conv_silu_backward(x.detach(), weight.detach(), bias.detach(), dout)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n_groups", [1, 4])
def test_gated_norm_matches_pytorch_on_split_gate(n_groups):
    torch.manual_seed(2)
    y = torch.randn(2, 5, 32, requires_grad=True)
    proj = torch.randn(2, 5, 50, requires_grad=True)
    z = proj[..., 10:42]  # the gate is a split of in_proj's output
    weight = torch.randn(32, requires_grad=True)
    want = _gated_rms_norm(y, z, weight, n_groups, 1e-5)
    got = kernels.gated_norm_forward(y.detach(), z.detach(), weight.detach(), n_groups, 1e-5)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    dout = torch.randn_like(want)
    grads = kernels.gated_norm_backward(y.detach(), z.detach(), weight.detach(), dout, n_groups, 1e-5)
    for g, w in zip(grads, torch.autograd.grad(want, (y, z, weight), dout), strict=True):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


def test_extreme_inputs_stay_finite():
    gate = torch.tensor([-1e4, -100.0, 0.0, 100.0, 1e4])
    up = torch.ones(5)
    out = kernels.swiglu_forward(gate, up)
    torch.testing.assert_close(out, F.silu(gate), atol=1e-6, rtol=1e-6)
    assert torch.isfinite(torch.cat(kernels.swiglu_backward(gate, up, torch.ones(5)))).all()


def test_results_do_not_depend_on_timing():
    torch.manual_seed(3)
    y, z, w, dout = torch.randn(64, 96), torch.randn(64, 96), torch.randn(96), torch.randn(64, 96)
    first = kernels.gated_norm_backward(y, z, w, dout, 1, 1e-5)
    for _ in range(5):
        again = kernels.gated_norm_backward(y, z, w, dout, 1, 1e-5)
        assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


def test_unusable_compiler_falls_back_with_a_warning(monkeypatch, tmp_path):
    monkeypatch.setenv("MAMBA_SLM_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    kernels.library.cache_clear()
    try:
        with pytest.warns(UserWarning, match="fused CPU kernels unavailable"):
            assert kernels.library() is None
        assert not kernels.supports(torch.ones(64, 1024))
        assert not list(tmp_path.rglob("*.so")) and not list(tmp_path.rglob("*.tmp"))
    finally:
        kernels.library.cache_clear()


def test_small_or_non_float32_inputs_use_pytorch():
    big = torch.ones(64, kernels.MIN_ELEMENTS // 64)
    assert kernels.supports(big)
    assert not kernels.supports(big.bfloat16())
    assert not kernels.supports(torch.ones(1, 512))  # a decode step: a ctypes call costs more


def test_softmax_cross_entropy_rows_and_gradients():
    torch.manual_seed(4)
    logits = torch.randn(6, 50) * 5
    targets = torch.tensor([3, -1, 0, 49, 7, -1])
    scale = torch.rand(6)
    want_loss = F.cross_entropy(logits, targets.clamp_min(0), reduction="none") * (targets >= 0)
    want_grad = (torch.softmax(logits, -1) - F.one_hot(targets.clamp_min(0), 50)) * scale[:, None]
    want_grad[targets < 0] = torch.softmax(logits[targets < 0], -1) * scale[targets < 0, None]
    got = logits.clone()
    loss = kernels.softmax_cross_entropy_(got, targets, scale)
    torch.testing.assert_close(loss, want_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, want_grad, atol=1e-6, rtol=1e-5)


# Every loop of kernels.c's linear_rows: tiles (fp32: 4 weight rows for one row, 3 for 4-5 rows;
# bf16: 4 weight rows for 1-4 rows, 2 for 5-8, 2 twice for 9-12), 4-row blocks (fp32, 2-3), rows as
# the lanes of an 8-wide vector (fp32, 6-9: the 9th in tiles) or of a 16-wide one (fp32 from 10,
# bf16 from 13).
ROW_COUNTS = [1, 2, 3, 4, 5, 6, 8, 9, 12, 13, 16]


@pytest.mark.parametrize("rows", ROW_COUNTS)
@pytest.mark.parametrize("in_features", [37, 150])  # a partial vector; two 64-wide blocks of sums and a tail
def test_linear_rows_matches_matmul(rows, in_features):
    torch.manual_seed(5)
    # 47 outputs: five 8-row blocks and a tail, not a multiple of 4, 3 or 2 either (every tile size's tail)
    x, weight, bias = torch.randn(rows, in_features), torch.randn(47, in_features), torch.randn(47)
    torch.testing.assert_close(
        kernels.linear_rows(x, weight, bias), x @ weight.t() + bias, atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(kernels.linear_rows(x, weight, None), x @ weight.t(), atol=1e-5, rtol=1e-5)
    few = weight[:3]  # fewer outputs than one block
    torch.testing.assert_close(kernels.linear_rows(x, few, None), x @ few.t(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rows", ROW_COUNTS)
@pytest.mark.parametrize("in_features", [37, 150])
def test_linear_rows_reads_bf16_weights_as_the_values_they_hold(rows, in_features):
    """A bf16 weight is widened, not rounded again: the product is the fp32 product of its values."""
    torch.manual_seed(6)
    x, weight, bias = torch.randn(rows, in_features), torch.randn(47, in_features).bfloat16(), torch.randn(47)
    want = x @ weight.float().t() + bias
    torch.testing.assert_close(kernels.linear_rows(x, weight, bias), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_decode_projection_of_no_rows_or_the_wrong_width_is_an_error_not_a_crash(dtype):
    from mamba_slm.model.linear import Linear

    layer = Linear(300, 48).to(dtype)
    with torch.no_grad():
        assert layer(torch.zeros(0, 300, dtype=dtype)).shape == (0, 48)  # was SIGFPE in the C kernel
        with pytest.raises(RuntimeError, match="cannot be multiplied"):
            layer(torch.zeros(2, 150, dtype=dtype))  # was a (2, 48) result read past x's end


def test_linear_rows_refuses_more_rows_than_its_buffers_hold():
    with pytest.raises(ValueError, match="at most 16 rows, got 17"):
        kernels.linear_rows(torch.randn(17, 8), torch.randn(4, 8), None)


def test_decode_projection_uses_the_kernel_and_matches_f_linear(monkeypatch):
    from mamba_slm.model.linear import Linear

    calls = []
    real = kernels.linear_rows
    monkeypatch.setattr(kernels, "linear_rows", lambda *a: calls.append(1) or real(*a))
    layer = Linear(64, 48, bias=True)
    x = torch.randn(3, 1, 64)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)
    assert calls  # few rows, no autograd: the kernel ran
    layer(torch.randn(3, 64, requires_grad=True)).sum().backward()  # training: F.linear, with gradients
    assert len(calls) == 1 and layer.weight.grad is not None


def test_a_bf16_decode_projection_uses_the_kernel_with_fp32_sums(monkeypatch):
    from mamba_slm.model.linear import Linear

    calls = []
    real = kernels.linear_rows
    monkeypatch.setattr(kernels, "linear_rows", lambda *a: calls.append(a[1].dtype) or real(*a))
    layer = Linear(300, 48, bias=True).to(torch.bfloat16)
    x = torch.randn(2, 1, 300).bfloat16()
    with torch.inference_mode():
        got = layer(x)
    want = F.linear(x.float(), layer.weight.float(), layer.bias.float())
    assert calls == [torch.bfloat16] and got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want.bfloat16(), atol=0, rtol=0)  # one rounding, at the end


@pytest.mark.parametrize("batch", [1, 3])
def test_fused_mamba2_step_matches_the_pytorch_step(batch, monkeypatch):
    from mamba_slm import ModelConfig
    from mamba_slm.model.cache import MambaState
    from mamba_slm.model.ssm import Mamba2Mixer

    torch.manual_seed(6)
    mixer = Mamba2Mixer(ModelConfig.from_preset("tiny", n_groups=2), layer_idx=0)
    with torch.no_grad():
        for p in (mixer.dt_bias, mixer.D, mixer.norm.weight, mixer.conv1d.bias):
            p.add_(torch.randn_like(p) * 0.3)
    conv = torch.randn(batch, mixer.conv1d.kernel_size[0] - 1, mixer.conv_dim)
    ssm_state = torch.randn(batch, mixer.n_heads, mixer.head_dim, mixer.d_state)
    hidden = torch.randn(batch, 1, mixer.in_proj.in_features)
    fused_state = MambaState(conv.clone(), ssm_state.clone())
    plain_state = MambaState(conv.clone(), ssm_state.clone())
    with torch.no_grad():
        assert mixer._fused_step_ok(mixer.in_proj(hidden[:, 0]), fused_state)
        fused = mixer.step(hidden, fused_state)
        monkeypatch.setattr(mixer, "_fused_step_ok", lambda *args: False)
        plain = mixer.step(hidden, plain_state)
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(fused_state.conv, plain_state.conv)
    torch.testing.assert_close(fused_state.ssm, plain_state.ssm, atol=1e-5, rtol=1e-5)


def test_linear_rows_operator_for_compiled_graphs():
    x, weight, bias = torch.randn(4, 1, 24), torch.randn(12, 24), torch.randn(12)
    torch.testing.assert_close(
        torch.ops.mamba_slm.linear_rows(x, weight, bias), F.linear(x, weight, bias), atol=1e-5, rtol=1e-5
    )
    torch.library.opcheck(
        kernels.linear_rows_op, (x, weight, bias), test_utils=("test_schema", "test_faketensor")
    )


# 16, 32 and 64: the head sizes whose query and running sum stay in registers; 12: any other
HEAD_DIMS = pytest.mark.parametrize("d", [16, 32, 64, 12])


@HEAD_DIMS
def test_one_query_attention_matches_sdpa_on_cache_views(d):
    torch.manual_seed(7)
    cache_k, cache_v = torch.randn(2, 2, 50, d), torch.randn(2, 2, 50, d)  # capacity 50, 37 used
    k, v = cache_k[:, :, :37], cache_v[:, :, :37]
    q = torch.randn(2, 1, 8, d).transpose(1, 2)  # (b, h, 1, d) as Attention.project returns it
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1))
    got = kernels.attend_one(q, k, v)  # 8 query heads over 2 KV heads
    torch.testing.assert_close(got, want.transpose(1, 2).reshape(2, 1, 8 * d), atol=1e-5, rtol=1e-5)


@HEAD_DIMS
def test_one_query_attention_over_many_key_blocks_rescales_its_running_softmax(d):
    torch.manual_seed(10)
    t = 3 * kernels.ATTEND_KEYS + 11  # three full blocks of the online softmax and a partial one
    cache_k, cache_v = torch.randn(3, 2, t + 5, d), torch.randn(3, 2, t + 5, d)
    cache_k[:, :, : t // 2] *= 0.1  # the largest scores come in later blocks: the running max rises
    k, v = cache_k[:, :, :t], cache_v[:, :, :t]
    q = torch.randn(3, 1, 4, d).transpose(1, 2) * 3
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1))
    got = kernels.attend_one(q, k, v)
    torch.testing.assert_close(got, want.transpose(1, 2).reshape(3, 1, 4 * d), atol=1e-5, rtol=1e-5)


@HEAD_DIMS
def test_one_query_attention_skips_padding_slots(d):
    torch.manual_seed(11)
    t = kernels.ATTEND_KEYS + 20
    k, v = torch.randn(2, 2, t, d), torch.randn(2, 2, t, d)
    v[1, :, 5] = float("nan")  # a padding slot's value may hold anything
    valid = torch.ones(2, t + 3, dtype=torch.bool)  # the cache's slots: capacity t + 3
    valid[0, : kernels.ATTEND_KEYS + 5] = False  # a whole block of padding, and more
    valid[1, 3:9] = False
    q = torch.randn(2, 1, 4, d).transpose(1, 2)
    mask = valid[:, None, None, :t]
    want = F.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.nan_to_num().repeat_interleave(2, 1), attn_mask=mask
    )
    got = kernels.attend_one(q, k, v, valid)
    torch.testing.assert_close(got, want.transpose(1, 2).reshape(2, 1, 4 * d), atol=1e-5, rtol=1e-5)


@HEAD_DIMS
def test_one_query_attention_reads_a_bf16_cache(d):
    torch.manual_seed(12)
    dtype = torch.bfloat16
    t = kernels.ATTEND_KEYS + 9
    k, v = torch.randn(2, 2, t, d).to(dtype), torch.randn(2, 2, t, d).to(dtype)
    q = torch.randn(2, 1, 4, d).transpose(1, 2)
    wide_k, wide_v = k.float().repeat_interleave(2, 1), v.float().repeat_interleave(2, 1)
    want = F.scaled_dot_product_attention(q, wide_k, wide_v)  # over the stored 16-bit values
    got = kernels.attend_one(q, k, v)
    torch.testing.assert_close(got, want.transpose(1, 2).reshape(2, 1, 4 * d), atol=1e-5, rtol=1e-5)


def test_fused_mlp_branch_matches_the_modules_and_never_skips_an_adapter(monkeypatch):
    from peft import LoraConfig, get_peft_model

    from mamba_slm import HybridLM, ModelConfig

    torch.manual_seed(8)
    model = HybridLM(ModelConfig.from_preset("tiny")).eval()
    block = model.layers[0]
    with torch.no_grad():
        block.mlp_norm.weight.add_(torch.randn_like(block.mlp_norm.weight) * 0.2)
    x = torch.randn(3, 1, model.config.d_model)
    with torch.no_grad():
        assert block._fused_mlp_weights(x) is not None
        fused = block.mlp_residual(x)
        monkeypatch.setattr(block, "_fused_mlp_weights", lambda x, cache=None: None)
        plain = block.mlp_residual(x)
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)
    monkeypatch.undo()
    with torch.no_grad():
        assert (
            block._fused_mlp_weights(torch.randn(3, 17, model.config.d_model)) is None
        )  # a prefill: modules
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["gate_proj"]))
    with torch.no_grad():
        assert (
            peft_model.base_model.model.layers[0]._fused_mlp_weights(x) is None
        )  # LoRA on gate_proj: modules


def test_decode_checks_are_made_per_cache_so_a_later_adapter_is_never_skipped():
    from peft import LoraConfig, get_peft_model

    from mamba_slm import HybridLM, ModelConfig

    torch.manual_seed(9)
    model = HybridLM(ModelConfig.from_preset("tiny", vocab_size=64)).eval()
    ids = torch.randint(0, 64, (1, 6))

    def decoded_logits(m):  # prefill 5 tokens, then the 6th as a decode step (fast paths memoised)
        cache = m.allocate_cache(1, 16)
        with torch.no_grad():
            m(ids[:, :5], cache=cache)
            return m(ids[:, 5:], cache=cache).logits[:, -1]

    decoded_logits(model)  # a first generation: its cache remembers that the plain MLPs are fusable
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["gate_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
        want = peft_model(input_ids=ids).logits[:, -1]  # full forward: the module path, adapters applied
    torch.testing.assert_close(decoded_logits(peft_model.base_model.model), want, atol=1e-4, rtol=1e-4)
