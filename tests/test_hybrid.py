"""The hybrid model: chunked == reference, cache == full forward, padding, checkpointing."""

import pytest
import torch

from mamba_slm import HybridLM, ModelConfig

VARIANTS = {
    "mamba2-rope": dict(mixer="mamba2", pos_encoding="rope"),
    "mamba2-alibi": dict(mixer="mamba2", pos_encoding="alibi"),
    "mamba2-nope": dict(mixer="mamba2", pos_encoding="none"),
    "mamba2-window": dict(mixer="mamba2", pos_encoding="rope", sliding_window=7),
    "mamba2-yarn": dict(mixer="mamba2", rope_scaling={"type": "yarn", "factor": 4.0}),
    "mamba1-rope": dict(mixer="mamba1", pos_encoding="rope"),
    "mamba1-window": dict(mixer="mamba1", pos_encoding="alibi", sliding_window=5),
    "mamba2-conv1": dict(mixer="mamba2", d_conv=1),  # no conv window to carry
    "mamba1-conv2": dict(mixer="mamba1", d_conv=2),
}


def tiny(**overrides) -> HybridLM:
    return HybridLM(ModelConfig.from_preset("tiny", **overrides)).eval()


def set_scan(model: HybridLM, impl: str) -> None:
    for module in model.modules():
        if hasattr(module, "scan_impl"):
            module.scan_impl = impl


@pytest.mark.parametrize("mixer", ["mamba2", "mamba1"])
@pytest.mark.parametrize("seqlen", [32, 27])  # a multiple of chunk_size=16, and not
def test_chunked_forward_equals_reference(mixer, seqlen):
    model = tiny(mixer=mixer).train()
    ids = torch.randint(0, 256, (2, seqlen))

    def run(impl):
        set_scan(model, impl)
        model.zero_grad()
        out = model(ids, labels=ids)
        out.loss.backward()
        return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    logits, grads = run("chunked")
    ref_logits, ref_grads = run("reference")
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-4)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], atol=1e-5, rtol=1e-3, msg=name)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_prefill_then_steps_equals_full_forward(variant, kernel_backend):
    model = tiny(**VARIANTS[variant])
    ids = torch.randint(0, 256, (2, 30))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.allocate_cache(2, capacity=8)  # small: forces the KV buffers to grow
        logits = [model(ids[:, :13], cache=cache).logits]
        for t in range(13, 30):
            logits.append(model(ids[:, t : t + 1], cache=cache).logits)
    torch.testing.assert_close(torch.cat(logits, dim=1), full, atol=1e-4, rtol=1e-4)
    conv_states = [state.conv for state in cache.layers if hasattr(state, "conv")]
    assert all(c.shape[1] == model.config.d_conv - 1 for c in conv_states)  # the window never grows


@pytest.mark.parametrize("variant", ["mamba2-rope", "mamba2-alibi", "mamba2-window", "mamba1-rope"])
def test_prefill_in_two_chunks_equals_one(variant):
    model = tiny(**VARIANTS[variant])
    ids = torch.randint(0, 256, (1, 40))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.allocate_cache(1)
        first = model(ids[:, :17], cache=cache).logits
        second = model(ids[:, 17:], cache=cache).logits
    torch.testing.assert_close(torch.cat([first, second], 1), full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variant", ["mamba2-rope", "mamba2-alibi", "mamba2-window", "mamba1-rope"])
def test_left_padded_batch_matches_each_row_alone(variant):
    model = tiny(**VARIANTS[variant])
    lengths = [21, 9, 14]
    rows = [torch.randint(1, 256, (n,)) for n in lengths]
    width = max(lengths)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = row
        mask[i, width - len(row) :] = 1
    with torch.no_grad():
        batch = model(ids, attention_mask=mask).logits
        cache = model.allocate_cache(len(rows))
        model(ids, attention_mask=mask, cache=cache)
        nxt = torch.randint(1, 256, (len(rows), 1))
        stepped = model(nxt, cache=cache).logits
        for i, row in enumerate(rows):
            alone = model(row[None]).logits[0]
            torch.testing.assert_close(batch[i, width - len(row) :], alone, atol=1e-4, rtol=1e-4)
            alone_next = model(torch.cat([row, nxt[i]])[None]).logits[0, -1]
            torch.testing.assert_close(stepped[i, 0], alone_next, atol=1e-4, rtol=1e-4)


def test_padding_is_ignored_by_the_loss():
    model = tiny()
    ids = torch.randint(1, 256, (1, 12))
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 4), torch.ones(1, 12)], 1).long()
    with torch.no_grad():
        loss = model(ids, labels=ids).loss
        padded_loss = model(padded, attention_mask=mask, labels=padded).loss
    torch.testing.assert_close(loss, padded_loss, atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_gives_same_gradients():
    model = tiny().train()
    ids = torch.randint(0, 256, (2, 24))

    def grads():
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    model.gradient_checkpointing_enable()
    checkpointed = grads()
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_cache_rows_select_and_expand():
    model = tiny()
    ids = torch.randint(0, 256, (2, 10))
    nxt = torch.randint(0, 256, (2, 1))
    with torch.no_grad():
        cache = model.allocate_cache(2)
        model(ids, cache=cache)
        cache.select_rows(torch.tensor([1, 0]))
        swapped = model(nxt.flip(0), cache=cache).logits
        ref = model(torch.cat([ids, nxt], 1)).logits[:, -1]
        torch.testing.assert_close(swapped[:, 0], ref.flip(0), atol=1e-4, rtol=1e-4)

        cache = model.allocate_cache(1)
        model(ids[:1], cache=cache)
        cache.expand_rows(3)
        out = model(nxt[:1].expand(3, 1), cache=cache).logits
        for row in out:
            torch.testing.assert_close(row[0], ref[0], atol=1e-4, rtol=1e-4)


def test_no_mlp_and_pure_mamba_and_pure_attention_build_and_run():
    for overrides in (dict(d_intermediate=0), dict(layer_pattern="MMM"), dict(layer_pattern="AA")):
        model = tiny(**overrides)
        ids = torch.randint(0, 256, (1, 9))
        assert model(ids).logits.shape == (1, 9, 256)


def test_training_reduces_loss():
    model = tiny().train()
    ids = torch.randint(0, 256, (4, 8)).repeat(1, 4)  # a repeating pattern to memorise
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_loss_without_logits_matches_and_trains_the_same():
    model = tiny().train()
    ids = torch.randint(1, 256, (2, 20))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0

    def grads(return_logits):
        model.zero_grad()
        out = model(ids, attention_mask=mask, labels=ids, return_logits=return_logits)
        out.loss.backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters()}

    full, full_grads = grads(True)
    fused, fused_grads = grads(False)
    assert fused.logits is None
    torch.testing.assert_close(fused.loss, full.loss)
    for name, grad in full_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("return_logits", [True, False])
def test_bf16_autocast_training_on_cpu(return_logits):
    model = tiny().train()
    ids = torch.randint(0, 256, (4, 8)).repeat(1, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(ids, labels=ids, return_logits=return_logits).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert losses[-1] < 0.6 * losses[0]
