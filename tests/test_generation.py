"""The generation engine: greedy == argmax loop, sampling filters, seeds, padding, stop rules, streaming."""

import random
import threading
from dataclasses import replace

import pytest
import torch

from mamba_slm import HybridLM, ModelConfig, generation
from mamba_slm.generation import (
    Engine,
    GenerationConfig,
    GenerationError,
    SamplingConfig,
    draw,
    filter_logits,
    generate,
    load_engine,
    next_tokens,
)
from mamba_slm.tokenizer import train_tokenizer

TEXT = ["The quick brown fox jumps over the lazy dog. " * 4, "Café, naïve, déjà vu — 東京 and ☃ snow. " * 4]


def tiny(vocab_size: int = 256, **overrides):
    torch.manual_seed(0)
    return HybridLM(ModelConfig.from_preset("tiny", vocab_size=vocab_size, **overrides)).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXT, vocab_size=300)


def argmax_loop(model, prompt, steps):
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return ids[0, len(prompt) :].tolist()


def test_greedy_batch_of_different_lengths_equals_argmax_loop():
    model = tiny()
    prompts = [[5, 17, 99, 3, 42, 7, 8], [200, 1], [9, 9, 9, 9]]
    out = generate(model, prompts, SamplingConfig(max_new_tokens=10, temperature=0))
    for prompt, tokens in zip(prompts, out, strict=True):
        assert tokens == argmax_loop(model, prompt, 10)


def test_left_padded_sampled_batch_gives_each_prompt_its_own_tokens():
    model, cfg = tiny(), GenerationConfig(max_new_tokens=12, temperature=0, repetition_penalty=1.3)
    prompts = [[5, 17, 99, 3, 42, 7, 8], [200, 1], [9, 9, 9, 9]]
    together = Engine(model).generate(prompts, cfg)
    for prompt, completion in zip(prompts, together, strict=True):
        assert completion.tokens == Engine(model).generate([prompt], cfg)[0].tokens


def test_many_prompts_run_in_batches_of_similar_length_and_come_back_in_order(monkeypatch):
    engine, rng = Engine(tiny()), random.Random(0)
    prompts = [[rng.randrange(1, 256) for _ in range(rng.randint(1, 30))] for _ in range(21)]
    greedy = GenerationConfig(max_new_tokens=6, temperature=0, repetition_penalty=1.3)
    alone = [engine.generate([p], greedy)[0].tokens for p in prompts]
    batches, run_batch = [], engine._generate_batch
    monkeypatch.setattr(engine, "_generate_batch", lambda ids, *a: batches.append(ids) or run_batch(ids, *a))
    engine.generate(prompts, greedy, batch_size=5)
    lengths = [sorted(len(p) for p in ids) for ids in batches]
    assert [len(b) for b in lengths] == [5, 5, 5, 5, 1]
    assert all(a[-1] <= b[0] for a, b in zip(lengths, lengths[1:], strict=False))  # similar lengths together
    for batch_size in (None, 4):  # None: 16 rows on a CPU, so 2 batches
        out = engine.generate(prompts, greedy, batch_size=batch_size)
        assert [c.prompt_index for c in out] == list(range(21))
        assert [c.tokens for c in out] == alone
    sampled = GenerationConfig(max_new_tokens=6, num_return_sequences=3, seed=7)
    assert engine.default_batch_size(sampled, 21) == 5  # 15 rows
    out = engine.generate(prompts, sampled)
    assert [c.prompt_index for c in out] == [i for i in range(21) for _ in range(3)]
    assert [c.tokens for c in out] == [c.tokens for c in engine.generate(prompts, sampled)]  # seeded
    same = engine.generate([prompts[0]] * 20, GenerationConfig(max_new_tokens=6, seed=7), batch_size=10)
    assert same[0].tokens != same[10].tokens  # each batch its own seed: equal batches draw different samples
    beams = engine.generate(prompts[:5], GenerationConfig(max_new_tokens=4, num_beams=3), batch_size=2)
    assert [c.tokens for c in beams] == [engine.generate([p], GenerationConfig(max_new_tokens=4, num_beams=3))[0].tokens
                                         for p in prompts[:5]]  # fmt: skip
    cancel = threading.Event()
    cancel.set()
    ended = engine.generate(prompts, sampled, cancel=cancel, batch_size=4)
    assert len(ended) == 63 and all(c.finish_reason == "cancelled" and c.tokens == [] for c in ended)
    with pytest.raises(GenerationError, match="batch_size: expected at least 1"):
        engine.generate(prompts, greedy, batch_size=0)


def test_a_bf16_kv_cache_halves_the_cache_and_keeps_greedy_close(monkeypatch):
    model = tiny()
    caches = []
    allocate = model.allocate_cache
    monkeypatch.setattr(
        model, "allocate_cache", lambda *a, **k: caches.append(allocate(*a, **k)) or caches[-1]
    )
    cfg = GenerationConfig(max_new_tokens=8, temperature=0)
    full = Engine(model).generate([[5, 17, 99, 3]], cfg)[0].tokens
    half = Engine(model, kv_cache_dtype=torch.bfloat16).generate([[5, 17, 99, 3]], cfg)[0].tokens
    kv = [[s.k for s in c.layers if hasattr(s, "k")][0] for c in caches]
    assert (kv[0].dtype, kv[1].dtype) == (torch.float32, torch.bfloat16)
    assert kv[1].untyped_storage().nbytes() * 2 == kv[0].untyped_storage().nbytes()
    assert len(half) == 8 and half[:4] == full[:4]  # rounding may flip a near tie later, not at once
    for bad in (torch.int8, "bfloat16"):
        with pytest.raises(GenerationError, match="kv_cache_dtype"):
            Engine(model, kv_cache_dtype=bad)
    with pytest.raises(GenerationError, match="--kv-cache-dtype int8"):
        load_engine("unused-path", kv_cache_dtype="int8")  # refused before the model is read


def test_a_half_precision_engine_decodes_like_its_own_full_forward(tiny_model_dir):
    """--dtype casts the weights (after loading) and the cache follows them; the recurrent decode
    steps in bf16/fp16 agree with a bf16/fp16 argmax loop over the whole sequence."""
    fp32 = load_engine(str(tiny_model_dir))
    prompt = fp32.encode(["To be or not"])[0]
    cfg = GenerationConfig(max_new_tokens=6, temperature=0)
    for name, dtype in (("bfloat16", torch.bfloat16), ("float16", torch.float16)):
        engine = load_engine(str(tiny_model_dir), dtype=name)
        assert {p.dtype for p in engine.model.parameters()} == {dtype}
        cache = engine.model.allocate_cache(1)
        assert {s.k.dtype for s in cache.layers if hasattr(s, "k")} == {dtype}
        assert engine.generate([prompt], cfg)[0].tokens == argmax_loop(engine.model, prompt, 6)
    with pytest.raises(GenerationError, match="--dtype int4: expected one of float32, bfloat16, float16"):
        load_engine(str(tiny_model_dir), dtype="int4")


def test_seeded_sampling_is_reproducible_and_stops_at_eos():
    model = tiny()
    cfg = SamplingConfig(max_new_tokens=20, temperature=1.0, top_p=0.9, seed=7)
    assert generate(model, [[1, 2, 3]], cfg) == generate(model, [[1, 2, 3]], cfg)
    first = generate(model, [[1, 2, 3]], cfg)[0]
    eos = first[4]
    stopped = generate(model, [[1, 2, 3]], SamplingConfig(**{**cfg.__dict__, "eos_token_id": eos}))[0]
    assert stopped[-1] == eos and len(stopped) == first.index(eos) + 1
    assert generate(model, [[1, 2, 3]], GenerationConfig(**{**cfg.__dict__, "seed": 8})) != [first]


def test_n_samples_come_from_one_prompt_and_differ():
    model = tiny()
    cfg = GenerationConfig(max_new_tokens=16, temperature=1.5, seed=3, num_return_sequences=4)
    out = Engine(model).generate([[1, 2, 3], [4, 5]], cfg)
    assert [c.prompt_index for c in out] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert len({tuple(c.tokens) for c in out[:4]}) > 1
    assert all(len(c.tokens) == 16 and c.finish_reason == "length" for c in out)


def test_filters_keep_only_allowed_tokens():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    top5 = filter_logits(logits, top_k=5)
    assert ((top5 > float("-inf")).sum(-1) == 5).all()
    nucleus = filter_logits(logits, top_p=0.5)
    for row, kept in zip(logits.softmax(-1), nucleus > float("-inf"), strict=True):
        kept_mass = row[kept].sum()
        assert kept_mass >= 0.5 and kept_mass - row[kept].min() < 0.5  # the smallest such set
    min_p = filter_logits(logits, min_p=0.3)
    probs = logits.softmax(-1)
    assert torch.equal(min_p > float("-inf"), probs >= 0.3 * probs.amax(-1, keepdim=True))


def sorted_filter(logits, top_k=0, top_p=1.0, min_p=0.0):
    """The filters spelled out over a full sort of each row: the oracle for `candidates`' shortcuts."""
    out = logits.clone()
    for row in out:
        order = row.argsort(descending=True)
        if top_k:
            row[order[top_k:]] = float("-inf")
        probs = row.softmax(-1)[order]
        row[order[(probs.cumsum(-1) - probs) > top_p]] = float("-inf")
        probs = row.softmax(-1)
        row[probs < min_p * probs.max()] = float("-inf")
    return out


@pytest.mark.parametrize("scale", [8.0, 2.5, 0.5], ids=["nucleus-in-128", "nucleus-in-1024", "whole-vocab"])
@pytest.mark.parametrize(
    "setting", [dict(top_p=0.9), dict(top_p=0.5, min_p=0.02), dict(top_k=300, top_p=0.8)]
)
def test_the_nucleus_found_among_the_likeliest_tokens_is_the_full_sorts(scale, setting):
    torch.manual_seed(2)
    logits = torch.randn(3, 4096) * scale
    want = sorted_filter(logits, **setting) > float("-inf")
    kept = filter_logits(logits, **setting) > float("-inf")
    assert torch.equal(kept, want)
    torch.testing.assert_close(filter_logits(logits, **setting)[want], logits[want])  # kept as they were
    sizes = want.sum(-1)
    if setting == dict(top_p=0.9):  # the scales reach each of the three searches
        assert {8.0: sizes.max() <= 128, 2.5: 128 < sizes.max() <= 1024, 0.5: sizes.max() > 1024}[scale]


def test_in_a_batch_only_the_rows_with_a_long_nucleus_sort_their_whole_vocabulary(monkeypatch):
    torch.manual_seed(3)
    logits = torch.randn(4, 4096) * torch.tensor(
        [[8.0], [0.5], [2.5], [8.0]]
    )  # nuclei of ~5, >1024, ~300, ~5
    logits[0, 0] = 30.0  # token 0 kept where the padded rows' spare slots also name token 0
    sorted_rows = []
    real_sort = torch.sort
    monkeypatch.setattr(torch, "sort", lambda x, **kw: sorted_rows.append(x.shape[0]) or real_sort(x, **kw))
    kept = filter_logits(logits, top_p=0.9)
    assert sorted_rows == [1]
    assert torch.equal(kept > float("-inf"), sorted_filter(logits, top_p=0.9) > float("-inf"))
    assert kept[0, 0] == 30.0
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        drawn = next_tokens(logits, GenerationConfig(temperature=1.0, top_p=0.9), generator)
        assert (kept[torch.arange(4), drawn] > float("-inf")).all()


def test_a_draw_follows_the_probabilities_and_never_picks_a_zero():
    probs = torch.tensor(
        [[0.0, 0.5, 0.0, 0.2, 0.3, 0.0], [2.0, 0.0, 0.0, 0.0, 0.0, 6.0]]
    )  # rows need not sum to 1
    generator = torch.Generator().manual_seed(0)
    drawn = torch.stack([draw(probs, generator) for _ in range(20_000)])  # (draws, rows)
    for row, p in enumerate(probs):
        freq = torch.bincount(drawn[:, row], minlength=6).float() / len(drawn)
        assert (freq[p == 0] == 0).all()
        torch.testing.assert_close(freq, p / p.sum(), atol=0.015, rtol=0)
    one_token = torch.tensor([[0.0, 0.0, 1.0]])
    assert draw(one_token, generator).item() == 2


@pytest.mark.parametrize(
    "setting", [{"top_k": 3}, {"top_p": 0.6}, {"min_p": 0.2}, {"top_k": 8, "top_p": 0.5}]
)
def test_sampling_never_draws_outside_the_allowed_set(setting):
    torch.manual_seed(1)
    logits = torch.randn(4, 40) * 2
    cfg = GenerationConfig(temperature=0.7, seed=0, **setting)
    allowed = filter_logits(logits / 0.7, cfg.top_k, cfg.top_p, cfg.min_p) > float("-inf")
    generator = torch.Generator().manual_seed(0)
    for _ in range(500):
        drawn = next_tokens(logits, cfg, generator)
        assert allowed[torch.arange(4), drawn].all()


def test_engine_samples_only_top_k_tokens_of_the_full_forward():
    model = tiny()
    out = Engine(model).generate([[3, 1, 4, 1, 5]], GenerationConfig(max_new_tokens=10, top_k=2, seed=0,
                                                                       num_return_sequences=6))  # fmt: skip
    for completion in out:
        ids = torch.tensor([[3, 1, 4, 1, 5] + completion.tokens])
        with torch.no_grad():
            logits = model(ids).logits[0, 4:-1]  # the logits each new token was drawn from
        top2 = logits.topk(2, dim=-1).indices
        assert (top2 == torch.tensor(completion.tokens)[:, None]).any(-1).all()


def test_repetition_penalty_sees_a_prompt_token_that_equals_the_padding_id():
    model, cfg = tiny(), GenerationConfig(max_new_tokens=8, temperature=0, repetition_penalty=50.0)
    engine = Engine(model)
    greedy = engine.generate([[3, 1, 4]], GenerationConfig(max_new_tokens=1, temperature=0))[0].tokens[0]
    engine.pad_id = greedy  # the short row's padding uses the very id its prompt contains
    rows = engine.generate([[3, 1, 4, 1, 5, 9], [greedy, 4]], cfg)
    assert greedy not in rows[1].tokens  # penalised as seen in the prompt, whatever the padding did
    assert rows[1].tokens == Engine(model).generate([[greedy, 4]], cfg)[0].tokens


def test_repetition_penalty_changes_greedy_output_toward_new_tokens():
    model = tiny()
    plain = Engine(model).generate([[7, 7, 7]], GenerationConfig(max_new_tokens=30, temperature=0))[0]
    penalised = Engine(model).generate(
        [[7, 7, 7]], GenerationConfig(max_new_tokens=30, temperature=0, repetition_penalty=5.0)
    )[0]
    assert len(set(penalised.tokens)) > len(set(plain.tokens))


def test_stop_strings_end_generation_and_are_not_emitted(tokenizer):
    model = tiny(len(tokenizer))
    engine = Engine(model, tokenizer)
    full = engine.generate(["The quick"], GenerationConfig(max_new_tokens=40, temperature=0))[0]
    assert len(full.text) > 12
    stop = full.text[8:11]
    cut = engine.generate(
        ["The quick"], GenerationConfig(max_new_tokens=40, temperature=0, stop_strings=(stop,))
    )
    assert cut[0].text == full.text[: full.text.find(stop)]
    assert cut[0].finish_reason == "stop" and len(cut[0].tokens) < len(full.tokens)
    assert tokenizer.decode(cut[0].tokens, skip_special_tokens=True) == cut[0].text


def test_streaming_deltas_join_to_the_full_text(tokenizer):
    model = tiny(len(tokenizer))
    engine = Engine(model, tokenizer)
    for cfg in (GenerationConfig(max_new_tokens=50, temperature=0),
                GenerationConfig(max_new_tokens=50, temperature=1.0, seed=5),
                GenerationConfig(max_new_tokens=50, temperature=1.0, seed=5, stop_strings=("e",))):  # fmt: skip
        deltas = list(engine.stream("Café", cfg))
        assert "".join(deltas) == engine.generate(["Café"], cfg)[0].text
        assert all(deltas)


def test_streaming_never_splits_a_multibyte_character(tokenizer, monkeypatch):
    """Script the tokens: characters whose UTF-8 bytes arrive one token at a time."""
    text = "naïve 東京 ☃!"
    scripted = [tokenizer.convert_tokens_to_ids(t) for t in tokenizer.tokenize(text)]
    assert len(scripted) > len(text.split())  # byte-level: multi-byte characters span several tokens
    engine = Engine(tiny(len(tokenizer)), tokenizer)
    monkeypatch.setattr(engine, "_steps", lambda ids, cfg, **kw: iter(torch.tensor([t]) for t in scripted))
    deltas = list(engine.stream("x", GenerationConfig(max_new_tokens=len(scripted))))
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)
    assert len(deltas) > 3


@pytest.mark.parametrize("stop", ["Q\uff1a", "\n\u00e9"])
def test_streaming_holds_back_a_stop_string_start_before_a_partial_character(tokenizer, stop, monkeypatch):
    """The stop string's next character arrives byte by byte: what precedes it must wait."""
    text = "Hi Q\uff1a there" if stop.startswith("Q") else "x \u00e9\n\u00e9 y"
    scripted = [tokenizer.convert_tokens_to_ids(t) for t in tokenizer.tokenize(text)]
    engine = Engine(tiny(len(tokenizer)), tokenizer)
    monkeypatch.setattr(engine, "_steps", lambda ids, cfg, **kw: iter(torch.tensor([t]) for t in scripted))
    cfg = GenerationConfig(max_new_tokens=len(scripted), stop_strings=(stop,))
    streamed = "".join(engine.stream("x", cfg))
    assert streamed == engine.generate(["x"], cfg)[0].text == text[: text.find(stop)]


def test_a_stop_token_never_shows_in_the_text(tokenizer):
    engine = Engine(tiny(len(tokenizer)), tokenizer)
    free = engine.generate(["The quick"], GenerationConfig(max_new_tokens=8, temperature=0))[0]
    stop_id = free.tokens[3]  # an ordinary (not special) token, as a stop token id
    cut = engine.generate(
        ["The quick"], GenerationConfig(max_new_tokens=8, temperature=0, stop_token_ids=(stop_id,))
    )
    assert cut[0].tokens == free.tokens[: free.tokens.index(stop_id) + 1] and cut[0].finish_reason == "stop"
    assert cut[0].text == tokenizer.decode(cut[0].tokens[:-1], skip_special_tokens=True)
    assert "".join(engine.stream("The quick", GenerationConfig(max_new_tokens=8, temperature=0,
                                                               stop_token_ids=(stop_id,)))) == cut[0].text  # fmt: skip


def test_streaming_decodes_each_token_a_bounded_number_of_times(tokenizer, monkeypatch):
    engine = Engine(tiny(len(tokenizer)), tokenizer)
    decoded = []
    real = tokenizer.decode
    monkeypatch.setattr(tokenizer, "decode", lambda ids, **kw: decoded.append(len(ids)) or real(ids, **kw))
    cfg = GenerationConfig(max_new_tokens=300, temperature=1.0, seed=3)
    text = "".join(engine.stream("x", cfg))
    assert text == real(engine.last_completion.tokens, skip_special_tokens=True)
    assert sum(decoded) < 20 * 300  # a full decode per step would be ~300**2 / 2


def test_incremental_text_equals_a_full_decode_after_every_token(tokenizer):
    from mamba_slm.generation import _IncrementalText

    rng = random.Random(0)
    pieces = [tokenizer.convert_tokens_to_ids(t) for t in tokenizer.tokenize("naïve 東京 ☃! Café, the end.")]
    for _ in range(20):
        tokens, inc = [], _IncrementalText(tokenizer)
        for _ in range(40):
            tokens.append(rng.choice(pieces + [rng.randrange(len(tokenizer))]))
            full = tokenizer.decode(tokens, skip_special_tokens=True)
            assert inc.text(tokens) == full


def test_generation_runs_in_eval_mode_and_leaves_a_training_model_training():
    model = tiny().train()
    modes = []
    model.register_forward_hook(lambda module, args, out: modes.append(module.training))
    engine = Engine(model)
    assert model.training
    engine.generate([[1, 2, 3]], GenerationConfig(max_new_tokens=3))
    engine.generate([[1, 2, 3]], GenerationConfig(max_new_tokens=3, num_beams=2, temperature=0))
    assert modes and not any(modes)  # every forward (prefill, steps, beams) in eval mode
    assert model.training


def test_cancellation_stops_generation():
    cancel = threading.Event()
    cancel.set()
    out = Engine(tiny()).generate([[1, 2]], GenerationConfig(max_new_tokens=50), cancel=cancel)[0]
    assert out.finish_reason == "cancelled" and out.tokens == []
    beams = Engine(tiny()).generate([[1, 2]], GenerationConfig(max_new_tokens=50, num_beams=3, num_return_sequences=3),
                                    cancel=cancel)  # fmt: skip
    assert [(b.finish_reason, len(b.tokens)) for b in beams] == [("cancelled", 1)] * 3  # ends after its step


@pytest.mark.parametrize(
    "setting", [{"temperature": 0}, {"num_beams": 3}, {"penalty_alpha": 0.5, "top_k": 3}]
)
def test_a_huge_token_limit_costs_nothing_up_front(setting):
    """A billion-token limit that a stop token cuts short: the KV buffers start small and grow."""
    stop_all = tuple(range(256))  # every token stops
    config = GenerationConfig(max_new_tokens=10**9, stop_token_ids=stop_all, **setting)
    out = Engine(tiny()).generate([[1, 2, 3]], config)[0]
    assert len(out.tokens) == 1 and out.finish_reason == "stop"


def test_kv_buffers_that_grow_during_generation_give_the_same_tokens(monkeypatch):
    model = tiny()
    want = argmax_loop(model, [5, 6, 7], 40)
    monkeypatch.setattr(generation, "KV_ROOM", 3)  # grows 3 + 3 -> 12 -> 24 -> 48 slots on the way
    assert (
        Engine(model).generate([[5, 6, 7]], GenerationConfig(max_new_tokens=40, temperature=0))[0].tokens
        == want
    )


def test_greedy_decodes_in_chunks_of_c_steps_and_ends_as_one_step_at_a_time_does(tokenizer, monkeypatch):
    model = tiny(len(tokenizer))
    engine = Engine(model, tokenizer)
    chunks, real = [], HybridLM.decode_greedy

    def counting(self, tokens, cache, steps, *args):
        out = real(self, tokens, cache, steps, *args)
        chunks.append(None if out is None else out.shape[0])
        return out

    plain = GenerationConfig(max_new_tokens=37, temperature=0)
    full = engine.generate(["The quick", "Café"], plain)
    stop_id, stop_string = full[0].tokens[20], full[1].text[9:12]
    configs = [plain, replace(plain, stop_token_ids=(stop_id,)), replace(plain, stop_strings=(stop_string,))]
    monkeypatch.setattr(HybridLM, "decode_greedy", counting)
    got = [engine.generate(["The quick", "Café"], cfg) for cfg in configs]
    assert chunks[:3] == [16, 16, 4]  # 1 token from the prefill, then chunks up to the limit
    assert None not in chunks and 1 not in chunks[:2]
    before = len(chunks)
    streamed = ["".join(engine.stream("Café", cfg)) for cfg in (plain, configs[2])]
    assert chunks[before : before + 9] == [4] * 9  # a stream's text arrives every 4 tokens
    monkeypatch.setattr(HybridLM, "decode_greedy", lambda *args, **kwargs: None)  # one forward per step
    for cfg, completions in zip(configs, got, strict=True):
        assert completions == engine.generate(["The quick", "Café"], cfg)
    assert got[0] == full
    assert got[1][0].finish_reason == "stop" and got[1][0].tokens[-1] == stop_id
    assert got[2][1].finish_reason == "stop" and stop_string not in got[2][1].text
    assert streamed == [got[0][1].text, got[2][1].text]


@pytest.mark.parametrize(
    "bad",
    [{"max_new_tokens": 0}, {"top_p": 0.0}, {"temperature": -1}, {"min_p": 1.0}, {"num_beams": 0},
     {"num_beams": 2, "num_return_sequences": 3}, {"penalty_alpha": 0.5, "top_k": 1},
     {"num_return_sequences": 2, "penalty_alpha": 0.5, "top_k": 4}],
)  # fmt: skip
def test_bad_settings_raise_one_clear_error(bad):
    with pytest.raises(GenerationError, match=next(iter(bad)) if "top_k" not in bad else "top_k|num_return"):
        GenerationConfig(**bad)


def test_bad_prompts_raise_clear_errors():
    engine = Engine(tiny())
    with pytest.raises(GenerationError, match="outside the vocabulary"):
        engine.generate([[1, 999]])
    with pytest.raises(GenerationError, match="need a tokenizer"):
        engine.generate(["text"])


@pytest.mark.slow
def test_compiled_decode_step_gives_the_same_tokens():
    model = tiny()
    prompts = [[5, 17, 99, 3, 42, 7, 8], [200, 1]]
    cfg = GenerationConfig(max_new_tokens=12, temperature=0)
    eager = [c.tokens for c in Engine(model).generate(prompts, cfg)]
    compiled = Engine(model, compile=True)
    assert all(block.compiled_step is not None for block in model.layers)
    assert [c.tokens for c in compiled.generate(prompts, cfg)] == eager
