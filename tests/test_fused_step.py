"""The whole decode step as one C call: the same logits and cache states as the module path, step
after step, and the module path wherever the C step does not cover the model or the input."""

import copy

import pytest
import torch

from conftest import NEEDS_C_COMPILER
from mamba_slm import HybridLM, ModelConfig
from mamba_slm.model import fused_step
from mamba_slm.model.cache import MambaState

pytestmark = NEEDS_C_COMPILER


@pytest.fixture
def fused_runs(monkeypatch):
    """Counts decode steps that ran as one C call."""
    runs = []
    real = fused_step.run

    def counting(*args):
        done = real(*args)
        runs.append(done)
        return done

    monkeypatch.setattr(fused_step, "run", counting)
    return runs


def _perturbed(config: ModelConfig, seed: int, biases: bool = False) -> HybridLM:
    """A model whose norms, SSM parameters and (optionally) attention biases are not at their
    init values, so a swapped or skipped parameter changes the output."""
    torch.manual_seed(seed)
    model = HybridLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.2)
        if biases:
            for block in model.layers:
                if block.kind == "A":
                    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                        linear = getattr(block.mixer, proj)
                        linear.bias = torch.nn.Parameter(torch.randn(linear.out_features) * 0.1)
    return model


def _decode(
    model: HybridLM, ids: torch.Tensor, prompt_len: int, reorder_at: int | None = None, kv_dtype=None
):
    """Prefill `prompt_len` tokens, then one token per step; returns every step's logits and the
    final cache. A small capacity makes the KV buffers grow in the middle; `reorder_at` reverses
    the rows there (beam search's reordering), and the ids with them."""
    cache = model.allocate_cache(ids.shape[0], capacity=prompt_len + 2, kv_dtype=kv_dtype)
    steps = []
    with torch.no_grad():
        model(ids[:, :prompt_len], cache=cache)
        for t in range(prompt_len, ids.shape[1]):
            if t == reorder_at:
                index = torch.arange(ids.shape[0] - 1, -1, -1)
                cache.select_rows(index)
                ids = ids[index]
            steps.append(model(ids[:, t : t + 1], cache=cache).logits[:, -1])
    return torch.stack(steps), cache


def _module_path(monkeypatch):
    monkeypatch.setattr(fused_step, "run", lambda *args: False)


CONFIGS = {
    "gqa+groups+biases": (dict(layer_pattern="MAMA", n_groups=2), True),
    "yarn rope": (
        dict(rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}),
        False,
    ),
    "no positions, no mlp": (dict(pos_encoding="none", d_intermediate=0), False),
    "mamba only": (dict(layer_pattern="MMM", n_layers=3), False),
}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("batch", [1, 3])
def test_whole_step_matches_the_module_path(name, batch, fused_runs, monkeypatch):
    overrides, biases = CONFIGS[name]
    model = _perturbed(ModelConfig.from_preset("tiny", vocab_size=96, **overrides), seed=batch, biases=biases)
    ids = torch.randint(0, 96, (batch, 16))
    got, got_cache = _decode(model, ids, prompt_len=5, reorder_at=9)
    assert fused_runs and all(fused_runs)  # every decode step ran as one C call
    _module_path(monkeypatch)
    want, want_cache = _decode(model, ids, prompt_len=5, reorder_at=9)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    for fused, plain in zip(got_cache.layers, want_cache.layers, strict=True):
        for a, b in zip(vars(fused).values(), vars(plain).values(), strict=True):
            if isinstance(a, torch.Tensor):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_bf16_kv_cache_matches_the_module_path_bit_for_bit(fused_runs, monkeypatch):
    kv_dtype = torch.bfloat16
    model = _perturbed(ModelConfig.from_preset("tiny", vocab_size=96, layer_pattern="MAMA"), seed=8)
    ids = torch.randint(0, 96, (2, 14))
    got, got_cache = _decode(model, ids, prompt_len=5, reorder_at=9, kv_dtype=kv_dtype)
    assert fused_runs and all(fused_runs)
    wide, _ = _decode(model, ids, prompt_len=5, reorder_at=9)  # an fp32 cache
    _module_path(monkeypatch)
    want, want_cache = _decode(model, ids, prompt_len=5, reorder_at=9, kv_dtype=kv_dtype)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    for fused, plain in zip(got_cache.layers, want_cache.layers, strict=True):
        if hasattr(fused, "k"):  # the C step rounds keys and values as PyTorch does
            assert (
                fused.k.dtype == kv_dtype and torch.equal(fused.k, plain.k) and torch.equal(fused.v, plain.v)
            )
    assert 0 < (got - wide).abs().max() < 0.05  # bf16 keys and values: close to the fp32 cache, not equal


@pytest.mark.parametrize("batch", [1, 3, 12])  # one row; 4-row blocks; rows as vector lanes
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16])
def test_a_bf16_model_steps_as_the_fp32_step_does_on_its_values(batch, kv_dtype):
    """A bf16 model's weight matrices are read as stored and widened, its small parameters widened
    once: the same arithmetic as the fp32 step of a model holding the very same values, so the
    hidden states and every cache state agree to fp32 rounding, step after step (a bf16 key may
    still round to the neighbouring bf16 value: one bf16 step, 2**-8 relative)."""
    tol = dict(atol=2e-6, rtol=1e-6) if kv_dtype == torch.float32 else dict(atol=1e-4, rtol=2**-8)
    config = ModelConfig.from_preset("tiny", vocab_size=96, layer_pattern="MAMA", n_groups=2)
    bf16 = _perturbed(config, seed=batch, biases=True).to(torch.bfloat16)
    wide = copy.deepcopy(bf16).float()
    caches = [m.allocate_cache(batch, capacity=8, kv_dtype=kv_dtype) for m in (bf16, wide)]
    assert all(s.ssm.dtype == torch.float32 for s in caches[0].layers if hasattr(s, "ssm"))
    torch.manual_seed(batch)
    with torch.no_grad():
        for _ in range(10):  # past the capacity: the KV buffers grow in between
            hidden = torch.randn(batch, 1, config.d_model)
            outs = []
            for model, cache in zip((bf16, wide), caches, strict=True):
                positions = cache.begin(1, None)
                attn = model._attention_inputs(positions, None, cache, torch.float32)
                out = hidden.clone()
                assert fused_step.run(model, out, attn, cache)
                cache.end(1)
                outs.append(out)
            torch.testing.assert_close(outs[0], outs[1], **tol)
    for got, want in zip(caches[0].layers, caches[1].layers, strict=True):
        for a, b in zip(vars(got).values(), vars(want).values(), strict=True):
            if isinstance(a, torch.Tensor):
                torch.testing.assert_close(a, b, **tol)


def test_a_bf16_model_decodes_in_one_call_close_to_its_module_path(fused_runs, monkeypatch):
    """End to end through the model: embedded bf16 tokens are widened for the call and the result
    rounded back; the module path computes in bf16 throughout, so the two agree to bf16 rounding."""
    model = _perturbed(ModelConfig.from_preset("tiny", vocab_size=96, layer_pattern="MAMA"), seed=9)
    model = model.to(torch.bfloat16)
    ids = torch.randint(0, 96, (2, 14))
    got, _ = _decode(model, ids, prompt_len=5, reorder_at=9)
    assert fused_runs and all(fused_runs)
    _module_path(monkeypatch)
    want, _ = _decode(model, ids, prompt_len=5, reorder_at=9)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), atol=0.05, rtol=0.05)


@pytest.mark.parametrize("pattern", ["AA", "MA"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_without_the_c_library_every_model_decodes_on_the_module_path(
    pattern, dtype, fused_runs, monkeypatch
):
    model = HybridLM(ModelConfig.from_preset("tiny", vocab_size=96, layer_pattern=pattern)).eval().to(dtype)
    ids = torch.randint(0, 96, (2, 9))
    want, _ = _decode(model, ids, prompt_len=5)
    monkeypatch.setattr(fused_step.kernels, "library", lambda: None)  # no compiler, or MAMBA_SLM_KERNELS=0
    fused_runs.clear()
    got, _ = _decode(model, ids, prompt_len=5)
    assert fused_runs and not any(fused_runs)
    torch.testing.assert_close(got.float(), want.float(), atol=0.05, rtol=0.05)


def test_left_padded_rows_match_the_module_path_and_never_see_their_padding(fused_runs, monkeypatch):
    model = _perturbed(ModelConfig.from_preset("tiny", vocab_size=96, layer_pattern="MAMA"), seed=7)
    ids = torch.randint(0, 96, (3, 14))
    prompt_mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1] * 6, [0, 1, 1, 1, 1, 1]])

    def decode():
        cache = model.allocate_cache(3, capacity=8)  # grows in the middle: the valid slots with it
        with torch.no_grad():
            model(ids[:, :6], attention_mask=prompt_mask, cache=cache)
            return torch.stack([model(ids[:, t : t + 1], cache=cache).logits[:, -1] for t in range(6, 14)])

    got = decode()
    assert fused_runs == [True] * 8
    _module_path(monkeypatch)
    torch.testing.assert_close(got, decode(), atol=1e-4, rtol=1e-4)
    alone = model(ids[2:, 1:]).logits[0, 5:]  # the third row without its padding
    torch.testing.assert_close(got[:, 2], alone, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("pattern", ["MMAM", "MMM"])
def test_a_padded_batch_fed_one_token_at_a_time_keeps_padding_out_of_the_states(pattern, fused_runs):
    """A one-token pass whose mask marks padding takes the module path, which leaves the states alone."""
    model = _perturbed(ModelConfig.from_preset("tiny", vocab_size=96, layer_pattern=pattern), seed=3)
    ids = torch.randint(0, 96, (3, 9))
    mask = torch.tensor([[0, 0, 0] + [1] * 6, [1] * 9, [0] + [1] * 8])
    cache = model.allocate_cache(3, capacity=4)
    with torch.no_grad():
        steps = [model(ids[:, t : t + 1], attention_mask=mask[:, t : t + 1], cache=cache).logits[:, -1]
                 for t in range(9)]  # fmt: skip
        for row, pad in enumerate((3, 0, 1)):
            alone = model(ids[row : row + 1, pad:]).logits[0]
            torch.testing.assert_close(torch.stack(steps[pad:])[:, row], alone, atol=1e-4, rtol=1e-4)
    assert any(fused_runs)  # the passes without padding still ran as one C call


def test_module_path_where_the_step_does_not_apply(fused_runs):
    tiny = ModelConfig.from_preset("tiny", vocab_size=96)
    model = _perturbed(tiny, seed=4)
    ids = torch.randint(0, 96, (2, 8))
    with torch.enable_grad():  # autograd
        model(ids[:, 7:8], cache=model.allocate_cache(2))
    with torch.no_grad():  # more rows than the few-row products are for
        model(torch.randint(0, 96, (17, 1)), cache=model.allocate_cache(17))
    with torch.no_grad():  # a KV cache type the C step does not read
        model(ids[:, 7:8], cache=model.allocate_cache(2, kv_dtype=torch.float16))
    assert fused_runs == [False, False, False]
    for overrides in (dict(pos_encoding="alibi"), dict(sliding_window=6)):  # masks beyond padding
        fused_runs.clear()
        _decode(_perturbed(ModelConfig.from_preset("tiny", vocab_size=96, **overrides), seed=4), ids, 4)
        assert fused_runs == [False] * 4 if "alibi" in overrides else [True, True, False, False]


def test_uncovered_layers_keep_the_module_path_and_their_outputs(fused_runs):
    from peft import LoraConfig, get_peft_model

    mamba1 = _perturbed(ModelConfig.from_preset("tiny", vocab_size=96, mixer="mamba1"), seed=5)
    ids = torch.randint(0, 96, (1, 7))
    _decode(mamba1, ids, prompt_len=5)
    assert fused_runs == [False] * 3  # the 5-token prefill of one row, then two steps

    model = _perturbed(ModelConfig.from_preset("tiny", vocab_size=96), seed=6)
    _decode(model, ids, prompt_len=5)  # a first generation on the plain model: the C step
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["in_proj", "o_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
        want = peft_model(input_ids=ids).logits[:, -2:]  # a full forward: adapters applied
    got, _ = _decode(peft_model.base_model.model, ids, prompt_len=5)
    assert fused_runs == [False] * 3 + [True] * 3 + [False] * 3
    torch.testing.assert_close(got.transpose(0, 1), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kv_dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("d_state", [16, 64, 24])  # the recurrence: unrolled for 16 and 64, else row by row
def test_a_few_tokens_of_one_row_run_as_one_call_with_the_full_forward_logits(kv_dtype, d_state, fused_runs):
    """A short prefill or a draft to verify: the tokens of one row through the C step together,
    the Mamba states token after token, each token attending up to its own slot. A pass of 2 tokens
    is shorter than the conv window (3 earlier positions): part of the old window stays."""
    config = ModelConfig.from_preset("tiny", vocab_size=96, layer_pattern="MAMA", d_state=d_state)
    model = _perturbed(config, seed=8)
    ids = torch.randint(0, 96, (1, 40))
    cache = model.allocate_cache(1, capacity=3, kv_dtype=kv_dtype)  # the KV buffers grow in between
    with torch.no_grad():
        want = model(ids).logits
        got = torch.cat(
            [
                model(ids[:, s : s + n], cache=cache).logits
                for s, n in ((0, 7), (7, 2), (9, 14), (23, 1), (24, 16))
            ],
            1,
        )
    assert fused_runs == [True] * 5 and cache.states_after is None  # nothing kept unless asked
    tol = 1e-4 if kv_dtype is None else 3e-2
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


@pytest.mark.parametrize("d_model", [64, 48])  # attention heads of 16 and of 12 (not one whole vector)
def test_passes_of_several_tokens_of_a_padded_row_never_see_its_padding(d_model, fused_runs):
    """Passes of 4 tokens and more share each key among their queries (attend_seq); 2 tokens do not.
    The row kept from a left-padded batch must skip its padding slots either way."""
    model = _perturbed(
        ModelConfig.from_preset("tiny", vocab_size=96, d_model=d_model, layer_pattern="MAMA"), seed=4
    )
    ids = torch.randint(0, 96, (2, 40))
    cache = model.allocate_cache(2, capacity=8)
    with torch.no_grad():
        model(ids[:, :8], attention_mask=torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [1] * 8]), cache=cache)
        cache.select_rows(torch.tensor([0]))
        fused_runs.clear()
        got = torch.cat(
            [model(ids[:1, s : s + n], cache=cache).logits for s, n in ((8, 5), (13, 2), (15, 16))], 1
        )
        want = model(ids[:1, 3:31]).logits[:, 5:]  # the row without its padding
    assert fused_runs == [True] * 3 and cache.padded
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def _prefilled(model: HybridLM, prompts: list[list[int]], capacity_room: int = 2):
    """A left-padded batch prefilled into a cache with little room (its KV buffers grow while
    decoding); returns the cache and each row's first greedy token."""
    longest = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    cache = model.allocate_cache(len(prompts), capacity=longest + capacity_room)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask, cache=cache).logits[:, -1]
    return cache, logits.argmax(-1)


def _used(state, seqlen: int) -> list[torch.Tensor]:
    """A layer's cache state: Mamba's conv window and SSM state, or the used slots of the KV buffers."""
    if isinstance(state, MambaState):
        return [state.conv, state.ssm]
    return [state.k[:, :, :seqlen], state.v[:, :, :seqlen]]


def _argmax_steps(model: HybridLM, cache, token: torch.Tensor, steps: int) -> list[list[int]]:
    """`steps` greedy steps through `forward`, one token per row each: (steps, rows) tokens."""
    out = []
    with torch.no_grad():
        for _ in range(steps):
            token = model(token[:, None], cache=cache).logits[:, -1].argmax(-1)
            out.append(token.tolist())
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("prompts", [[[5, 17, 9]], [[5, 17, 9, 3, 42], [20, 1], [9, 9, 9]]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_chunks_give_the_tokens_and_states_of_step_by_step_argmax(name, prompts, dtype):
    overrides, biases = CONFIGS[name]
    model = _perturbed(ModelConfig.from_preset("tiny", vocab_size=96, **overrides), seed=7, biases=biases)
    model = model.to(dtype)
    want_cache, first = _prefilled(model, prompts)
    want = _argmax_steps(model, want_cache, first, 13)
    cache, token = _prefilled(model, prompts)
    got = []
    with torch.no_grad():
        for chunk in (5, 1, 7):  # the KV buffers grow inside the first chunk
            steps = model.decode_greedy(token, cache, chunk)
            assert steps is not None and steps.shape == (chunk, len(prompts))
            got += steps.tolist()
            token = steps[-1]
    assert got == want
    assert (cache.seqlen, cache.next_pos.tolist()) == (want_cache.seqlen, want_cache.next_pos.tolist())
    for fused, plain in zip(cache.layers, want_cache.layers, strict=True):
        for a, b in zip(_used(fused, cache.seqlen), _used(plain, cache.seqlen), strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    # and the cache goes on from there as from forward's steps
    assert _argmax_steps(model, cache, token, 3) == _argmax_steps(
        model, want_cache, torch.tensor(want[-1]), 3
    )


def test_a_greedy_chunk_ends_after_the_step_that_finishes_the_last_row():
    model = _perturbed(ModelConfig.from_preset("tiny", vocab_size=96), seed=8)
    prompts = [[5, 17, 9, 3], [20, 1, 33, 2]]
    want_cache, first = _prefilled(model, prompts, capacity_room=32)
    want = _argmax_steps(model, want_cache, first, 12)
    stop = want[4][0]  # row 0's 5th token; row 1 already finished before the chunk
    end = next(t for t in range(12) if want[t][0] == stop) + 1
    cache, token = _prefilled(model, prompts, capacity_room=32)
    finished = torch.tensor([False, True])
    with torch.no_grad():
        steps = model.decode_greedy(token, cache, 12, stop_ids=(90, stop), finished=finished)
    assert steps.tolist() == want[:end]
    assert finished.tolist() == [True, True] and cache.seqlen == want_cache.seqlen - 12 + end
    finished = torch.tensor([False, False])  # row 1 still going: the whole chunk runs
    cache, token = _prefilled(model, prompts, capacity_room=32)
    with torch.no_grad():
        steps = model.decode_greedy(token, cache, 12, stop_ids=(stop,), finished=finished)
    assert steps.tolist() == want and finished.tolist() == [True, stop in [row[1] for row in want]]


def test_greedy_chunks_leave_to_forward_what_the_c_step_does_not_cover():
    from peft import LoraConfig, get_peft_model

    tiny = ModelConfig.from_preset("tiny", vocab_size=96)
    uncovered = {
        "fp16 model": (_perturbed(tiny, seed=9).to(torch.float16), 2),
        "alibi": (
            _perturbed(ModelConfig.from_preset("tiny", vocab_size=96, pos_encoding="alibi"), seed=9),
            2,
        ),
        "window narrower than the context": (
            _perturbed(ModelConfig.from_preset("tiny", vocab_size=96, sliding_window=6), seed=9),
            2,
        ),
        "17 rows": (_perturbed(tiny, seed=9), 17),
        "adapted LM head": (
            get_peft_model(
                _perturbed(tiny, seed=9), LoraConfig(r=2, target_modules=["lm_head"])
            ).base_model.model,
            2,
        ),
    }
    for name, (model, rows) in uncovered.items():
        cache, token = _prefilled(model, [[5, 17, 9, 3]] * rows)
        with torch.no_grad():
            assert model.decode_greedy(token, cache, 4) is None, name
        assert cache.seqlen == 4, name  # nothing done
    model = _perturbed(tiny, seed=9)
    cache, token = _prefilled(model, [[5, 17, 9, 3]])
    with torch.enable_grad():
        assert model.decode_greedy(token, cache, 4) is None  # autograd
    with torch.no_grad(), pytest.raises(IndexError, match=r"token ids must be in \[0, 96\)"):
        model.decode_greedy(torch.tensor([96]), cache, 4)  # never read past the embedding table
    with torch.no_grad(), pytest.raises(ValueError, match="at least 1 step"):
        model.decode_greedy(token, cache, 0)
    assert cache.seqlen == 4
