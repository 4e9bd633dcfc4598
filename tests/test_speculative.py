"""Prompt-lookup decoding: the same tokens as plain greedy (and as plain sampling with the same
seed), fewer passes where the text repeats, and a cache that takes rejected draft tokens back, on
the C step and on the module path."""

import random
from dataclasses import replace

import pytest
import torch

from mamba_slm import HybridLM, ModelConfig, speculative
from mamba_slm.checkpoint import CheckpointError
from mamba_slm.generation import Engine, GenerationConfig, GenerationError, load_engine
from mamba_slm.model.cache import HybridCache
from mamba_slm.speculative import NGRAMS_NAME, CorpusNgrams, NgramIndex, predicted_ngrams
from mamba_slm.tokenizer import train_tokenizer

LOOPING_PROMPT = [5, 6, 7, 8, 9] * 4


def tiny(seed: int = 0, **overrides) -> HybridLM:
    torch.manual_seed(seed)
    return HybridLM(ModelConfig.from_preset("tiny", vocab_size=64, **overrides)).eval()


@pytest.fixture
def rewinds(monkeypatch):
    """Every `HybridCache.rewind` call: (tokens taken back, whether the trail served)."""
    calls = []
    real = HybridCache.rewind

    def spy(self, n):
        served = real(self, n)
        calls.append((n, served))
        return served

    monkeypatch.setattr(HybridCache, "rewind", spy)
    return calls


def test_the_draft_continues_an_earlier_match_of_the_longest_suffix():
    index = NgramIndex([1, 2, 3, 4, 9, 2, 3, 5, 6, 7, 8, 2, 3])
    assert index.draft(2) == [5, 6]  # (8 2 3) is only the suffix itself; (2 3) last went on with 5 6
    assert index.draft(7) == [4, 9, 2, 3, 5, 6, 7]  # the latest (2 3) has 6 tokens after it, not 7
    assert index.draft(12) == [4, 9, 2, 3, 5, 6, 7, 8, 2, 3]  # none has 12: the one with the most
    index.add(1)
    assert index.draft(2) == [2, 3]  # (3 1) and (2 3 1) are new, (1) began the list
    index.add(0)
    assert index.draft(3) == []  # 0 never came before
    loop = NgramIndex([4] * 8)
    assert loop.draft(3) == [4, 4, 4]  # not cut short by the match that overlaps the suffix


@pytest.mark.parametrize(
    "overrides",
    [
        dict(layer_pattern="MAMA"),  # the C step: a trail per pass
        dict(layer_pattern="AA"),
        dict(mixer="mamba1"),  # the module path: back to before the pass, then a replay
        dict(layer_pattern="MAMA", dtype_bf16=True),
    ],
    ids=["hybrid", "attention", "mamba1-module-path", "bf16"],
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_prompt_lookup_gives_plain_greedy_tokens_in_fewer_passes(overrides, seed):
    overrides = dict(overrides)
    bf16 = overrides.pop("dtype_bf16", False)
    model = tiny(seed, **overrides)
    if bf16:
        model = model.to(torch.bfloat16)
    engine = Engine(model)
    passes = []
    model.register_forward_hook(lambda module, args, out: passes.append(args[0].shape[1]))
    plain = engine.generate([LOOPING_PROMPT], GenerationConfig(max_new_tokens=37, temperature=0))[0]
    passes[:] = []
    fast = engine.generate(
        [LOOPING_PROMPT], GenerationConfig(max_new_tokens=37, temperature=0, prompt_lookup=4)
    )[0]
    assert fast.tokens == plain.tokens and len(fast.tokens) == 37
    assert len(passes) < 37  # drafts were accepted: fewer passes than plain decoding's one per token
    assert max(passes[1:]) <= 5  # the last token and at most 4 drafted


def test_both_ways_of_taking_tokens_back_are_exercised(rewinds):
    for overrides, served in ((dict(layer_pattern="AA"), True), (dict(mixer="mamba1"), False)):
        rewinds.clear()
        engine = Engine(tiny(0, **overrides))
        engine.generate([LOOPING_PROMPT], GenerationConfig(max_new_tokens=37, temperature=0, prompt_lookup=4))
        assert rewinds and all(s is served for _, s in rewinds)


@pytest.mark.parametrize(
    "overrides, served",
    [
        (dict(layer_pattern="MAMA"), True),  # d_state 16: the replay's unrolled recurrence
        (dict(layer_pattern="MAMA", d_state=64), True),  # the presets' d_state, unrolled too
        (dict(layer_pattern="MAMA", d_model=48, head_dim=6), True),  # head size 6: row by row
        (dict(mixer="mamba1"), False),
    ],
    ids=["c-step", "c-step-d_state-64", "c-step-row-by-row", "module-path"],
)
def test_a_rewound_cache_continues_like_the_full_forward(overrides, served):
    model = tiny(3, **overrides)
    ids = torch.randint(0, 64, (1, 24))
    with torch.no_grad():
        full = model(ids).logits
        for taken_back in range(1, 6):  # of a 6-token pass
            cache = model.allocate_cache(1, capacity=4)  # the KV buffers grow during the passes
            model(ids[:, :10], cache=cache)
            cache.keep_trail = True
            model(
                torch.cat([ids[:, 10 : 16 - taken_back], torch.randint(0, 64, (1, taken_back))], 1),
                cache=cache,
            )
            kept = 16 - taken_back
            assert cache.rewind(taken_back) is served
            if not served:
                assert cache.seqlen == 10
                model(ids[:, 10:kept], cache=cache)
            assert cache.seqlen == kept and int(cache.next_pos) == kept
            rest = model(ids[:, kept:], cache=cache).logits
            torch.testing.assert_close(rest, full[:, kept:], atol=1e-4, rtol=1e-4)


def test_rewind_needs_a_pass_that_kept_what_it_takes():
    model = tiny(0, layer_pattern="MAMA")
    cache = model.allocate_cache(1)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]), cache=cache)  # keep_trail off
    with pytest.raises(ValueError, match="kept nothing"):
        cache.rewind(1)
    for overrides in (dict(layer_pattern="MAMA"), dict(layer_pattern="AA"), dict(mixer="mamba1")):
        model = tiny(0, **overrides)
        cache = model.allocate_cache(1)
        cache.keep_trail = True
        with torch.no_grad():
            model(torch.tensor([[1, 2, 3, 4]]), cache=cache)
            model(torch.tensor([[5, 6, 7]]), cache=cache)
        for n in (0, 3, 4):  # at least one token of the pass stays: what it had before is not kept
            with pytest.raises(ValueError, match="expected 1 to 2 tokens"):
                cache.rewind(n)
        cache.rewind(2)
        with pytest.raises(ValueError):  # once
            cache.rewind(1)


def test_the_trail_is_fp32_whatever_torchs_default_dtype():
    model = tiny(3, layer_pattern="MAMA")
    ids = torch.randint(0, 64, (1, 20))
    torch.set_default_dtype(torch.float64)  # e.g. left so by a script; the states stay fp32
    try:
        with torch.no_grad():
            full = model(ids).logits
            cache = model.allocate_cache(1)
            model(ids[:, :8], cache=cache)
            cache.keep_trail = True
            model(ids[:, 8:14], cache=cache)
            assert cache.rewind(4)  # keep ids 8 and 9, from the trail
            rest = model(ids[:, 10:], cache=cache).logits
    finally:
        torch.set_default_dtype(torch.float32)
    torch.testing.assert_close(rest, full[:, 10:], atol=1e-4, rtol=1e-4)


def test_stop_tokens_and_the_token_limit_end_a_lookup_generation_like_a_plain_one():
    engine = Engine(tiny(1, layer_pattern="MAMA"))
    plain = engine.generate([LOOPING_PROMPT], GenerationConfig(max_new_tokens=30, temperature=0))[0].tokens
    stop = plain[12]
    for limit in (1, 2, 13, 30):
        for stops in ((), (stop,)):
            config = GenerationConfig(max_new_tokens=limit, temperature=0, stop_token_ids=stops)
            want = engine.generate([LOOPING_PROMPT], config)[0]
            got = engine.generate([LOOPING_PROMPT], replace(config, prompt_lookup=6))[0]
            assert (got.tokens, got.finish_reason) == (want.tokens, want.finish_reason)


def test_several_prompts_each_get_their_own_lookup():
    engine = Engine(tiny(2, layer_pattern="MAMA"))
    prompts = [LOOPING_PROMPT, [3, 1, 4, 1, 5, 9, 2, 6], [7] * 9]
    plain = engine.generate(prompts, GenerationConfig(max_new_tokens=20, temperature=0))
    fast = engine.generate(prompts, GenerationConfig(max_new_tokens=20, temperature=0, prompt_lookup=3))
    assert [c.tokens for c in fast] == [c.tokens for c in plain]
    assert [c.prompt_index for c in fast] == [0, 1, 2]


@pytest.mark.parametrize(
    "settings",
    [
        dict(
            temperature=0.02, seed=4
        ),  # a random model's logits are close: this is cold enough to keep drafts
        dict(temperature=1.0, top_k=5, min_p=0.05, seed=5),
        dict(temperature=0.8, top_p=0.9, repetition_penalty=1.3, seed=6),
        dict(temperature=0, repetition_penalty=1.2),  # greedy through the penalty
        dict(temperature=0.7),  # the global generator: the same draws after the same manual_seed
    ],
    ids=["cold", "top-k-min-p", "top-p-penalty", "greedy-penalty", "unseeded"],
)
@pytest.mark.parametrize(
    "overrides", [dict(layer_pattern="MAMA"), dict(mixer="mamba1")], ids=["c-step", "module"]
)
def test_prompt_lookup_draws_the_samples_plain_sampling_draws(settings, overrides):
    """Each yielded token takes one draw, in plain sampling's order: the same tokens for the same seed."""
    model = tiny(7, **overrides)
    engine = Engine(model)
    passes = []
    model.register_forward_hook(lambda module, args, out: passes.append(args[0].shape[1]))
    config = GenerationConfig(max_new_tokens=40, **settings)
    torch.manual_seed(11)
    plain = engine.generate([LOOPING_PROMPT], config)[0].tokens
    plain_passes, passes[:] = len(passes), []
    torch.manual_seed(11)
    fast = engine.generate([LOOPING_PROMPT], replace(config, prompt_lookup=6))[0].tokens
    assert fast == plain and len(fast) == 40
    if settings["temperature"] == 0.02:
        assert len(passes) < plain_passes  # drafts were kept
    assert max(passes) > 1  # and drafted in any case


def test_a_source_whose_drafts_are_rarely_kept_pauses_and_the_samples_stay_the_same(monkeypatch):
    """Hot sampling on a random model keeps almost no draft: the source pauses (mostly one-token
    passes) instead of paying a longer pass for every rejected draft; the tokens do not change."""
    model = tiny(7, layer_pattern="MAMA")
    passes = []
    model.register_forward_hook(lambda module, args, out: passes.append(args[0].shape[1]))
    config = GenerationConfig(max_new_tokens=200, temperature=1.5, seed=2, prompt_lookup=6)
    prompt = [5, 6, 7, 8] * 10  # every token has earlier matches: a draft is found at every pass
    plain = Engine(model).generate([prompt], replace(config, prompt_lookup=0))[0].tokens
    runs = {}
    for kept_min in (0.0, speculative.KEPT_MIN):  # 0: never paused
        monkeypatch.setattr(speculative, "KEPT_MIN", kept_min)
        passes.clear()
        assert Engine(model).generate([prompt], config)[0].tokens == plain
        runs[kept_min] = sum(n > 1 for n in passes[1:])  # passes that sent a draft
    assert runs[speculative.KEPT_MIN] < runs[0.0] / 2, runs


def test_a_sampled_lookup_stream_joins_to_the_plain_sampled_text():
    tokenizer = train_tokenizer(
        ["the cat sat on the mat; " * 20, "héllo wörld — ünïcode ✓ " * 10], vocab_size=300
    )
    torch.manual_seed(8)
    model = HybridLM(ModelConfig.from_preset("tiny", vocab_size=len(tokenizer), layer_pattern="MAMA")).eval()
    engine = Engine(model, tokenizer)
    config = GenerationConfig(max_new_tokens=30, temperature=0.4, seed=3)
    prompt = "the cat sat on the mat; the cat sat on the mat; héllo wörld ✓"
    want = engine.generate([prompt], config)[0].text
    assert "".join(engine.stream(prompt, replace(config, prompt_lookup=5))) == want


@pytest.mark.parametrize(
    "settings",
    [dict(temperature=0, num_beams=2), dict(temperature=0, penalty_alpha=0.5, top_k=3),
     dict(temperature=0.7, num_return_sequences=2), dict(temperature=0, prompt_lookup=-1)],
)  # fmt: skip
def test_prompt_lookup_is_refused_outside_greedy_and_sampling(settings):
    with pytest.raises(GenerationError, match="prompt_lookup"):
        GenerationConfig(**{"prompt_lookup": 4, **settings})


def test_the_corpus_table_keeps_each_contexts_most_frequent_next_token():
    docs = [[1, 2, 3] * 4 + [1, 2, 4], [1, 2, 4, 5], [5, 6], [5, 6], [5, 7]]
    table = CorpusNgrams.count(docs, vocab_size=8, min_count=2)
    assert table.draft([1, 2], 3) == [3, 1, 2]  # (1 2) went on with 3 four times, with 4 twice
    assert table.draft([9, 5], 1) == [6]  # (9 5) was never seen: the one-token context (5) decides
    assert table.draft([7], 2) == []  # (7) was seen once, fewer than min_count
    assert table.draft([4], 1) == []  # (4 5) once only; documents are not joined: (4) -> (5) is not a pair
    assert CorpusNgrams.count(docs, vocab_size=8, min_count=1).draft([4], 1) == [5]


def test_the_table_can_count_what_a_model_predicted_instead_of_the_next_token():
    docs = [[1, 2, 3, 1, 2, 3], [1, 2]]
    predicted = [[0, 4, 0, 0, 4, 0], [0, 5]]  # after position i of each document
    table = CorpusNgrams.count(docs, vocab_size=8, min_count=1, predictions=predicted)
    assert table.next_token[0] == {1: 0, 2: 4, 3: 0}  # (2) was followed by its prediction 4 twice, 5 once
    assert table.next_token[1] == {1 * 8 + 2: 4, 2 * 8 + 3: 0, 3 * 8 + 1: 0}  # (1 2) ended each document
    assert table.draft([3, 1, 2], 1) == [4]  # and not the text's own 3
    with pytest.raises(ValueError, match="1 predictions for a document of 2 tokens"):
        CorpusNgrams.count([[1, 2]], vocab_size=8, predictions=[[3]])
    with pytest.raises(ValueError, match="token id 9 outside the vocabulary"):
        CorpusNgrams.count([[1, 2]], vocab_size=8, predictions=[[3, 9]])


def test_predicted_ngrams_counts_the_models_greedy_tokens_on_a_sample_of_blocks():
    model = tiny(4).train()
    gen = torch.Generator().manual_seed(0)
    blocks = [torch.randint(0, 64, (n,), generator=gen).tolist() for n in [9, 9, 9, 5, 9, 5, 9]]
    table = predicted_ngrams(model, blocks, max_tokens=30, min_count=1, seed=3)
    assert model.training  # put back as it was
    # The same blocks by hand, one at a time: whole blocks picked at random until 30 tokens are in.
    order = list(range(len(blocks)))
    random.Random(3).shuffle(order)
    picked, total = [], 0
    for i in order:
        if total >= 30:
            break
        picked.append(blocks[i])
        total += len(blocks[i])
    assert 30 <= total < 39
    with torch.no_grad():
        model.eval()
        predicted = [model(torch.tensor([b])).logits[0].argmax(-1).tolist() for b in picked]
    want = CorpusNgrams.count(picked, 64, min_count=1, predictions=predicted)
    assert table.next_token == want.next_token and len(table) > 0
    everything = predicted_ngrams(model, blocks, max_tokens=10**6, min_count=1)
    assert len(everything) > len(table)


def test_the_corpus_table_is_saved_and_loaded_as_safetensors_and_checked(tmp_path):
    table = CorpusNgrams.count([[3, 4, 5] * 20], vocab_size=16)
    table.save(tmp_path / NGRAMS_NAME)
    loaded = CorpusNgrams.load(tmp_path / NGRAMS_NAME, vocab_size=16)
    assert loaded.next_token == table.next_token and loaded.draft([3], 4) == [4, 5, 3, 4]
    with pytest.raises(CheckpointError, match="counted for a 16-token vocabulary, the model has 32"):
        CorpusNgrams.load(tmp_path / NGRAMS_NAME, vocab_size=32)
    (tmp_path / "bad.safetensors").write_bytes(b"not a table")
    with pytest.raises(CheckpointError, match="bad.safetensors: not a lookup n-gram table"):
        CorpusNgrams.load(tmp_path / "bad.safetensors", vocab_size=16)
    outside = CorpusNgrams(16, [{3: 40}, {}])  # a next token past the vocabulary
    outside.save(tmp_path / "outside.safetensors")
    with pytest.raises(CheckpointError, match="next1 holds a token outside the vocabulary"):
        CorpusNgrams.load(tmp_path / "outside.safetensors", vocab_size=16)


@pytest.mark.parametrize("pattern", ["MAMA", "MMM"])
def test_corpus_drafts_give_plain_greedy_tokens_in_fewer_passes(pattern):
    """Where the context has no earlier match (here: the first tokens, before the random model's
    text loops), the corpus table drafts; counted from a corpus holding this very text, it is right."""
    model = tiny(3, layer_pattern=pattern)
    passes = []
    model.register_forward_hook(lambda module, args, out: passes.append(1))
    greedy = GenerationConfig(max_new_tokens=12, temperature=0)
    prompt = [40, 41, 42, 43]
    want = Engine(model).generate([prompt], greedy)[0].tokens
    table = CorpusNgrams.count([prompt + want], vocab_size=64, min_count=1)
    counts = {}
    for name, ngrams in (("context only", None), ("with corpus", table)):
        passes.clear()
        got = Engine(model, ngrams=ngrams).generate([prompt], replace(greedy, prompt_lookup=6))[0].tokens
        assert got == want, name
        counts[name] = len(passes)
    assert counts["with corpus"] < counts["context only"] - 2, counts


def test_load_engine_reads_the_model_directorys_corpus_table(tmp_path):
    from mamba_slm.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(["to be or not to be " * 20], vocab_size=280, output_dir=tmp_path)
    HybridLM(ModelConfig.from_preset("tiny", vocab_size=len(tokenizer))).save_pretrained(tmp_path)
    assert load_engine(str(tmp_path)).ngrams is None
    CorpusNgrams.count([[5, 6, 7] * 20], len(tokenizer)).save(tmp_path / NGRAMS_NAME)
    assert load_engine(str(tmp_path)).ngrams.draft([5], 2) == [6, 7]
    CorpusNgrams.count([[5, 6]], 999).save(tmp_path / NGRAMS_NAME)  # another tokenizer's
    engine = load_engine(str(tmp_path))  # read when lookup needs it: plain generation is unaffected
    greedy = GenerationConfig(max_new_tokens=3, temperature=0)
    assert len(engine.generate([[5, 6]], greedy)[0].tokens) == 3
    with pytest.raises(CheckpointError, match=f"{NGRAMS_NAME}: counted for a 999-token vocabulary"):
        engine.generate([[5, 6]], replace(greedy, prompt_lookup=4))
    with pytest.raises(GenerationError, match="ngrams: counted for a 999-token vocabulary"):
        Engine(engine.model, ngrams=CorpusNgrams.count([[5, 6]], 999))


def test_bad_corpus_tables_and_ids_are_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match="token id 40 outside the vocabulary"):
        CorpusNgrams.count([[1, 40]] * 3, vocab_size=32)
    (tmp_path / "taken").mkdir()
    with pytest.raises(CheckpointError, match="taken: cannot write the n-gram table"):
        CorpusNgrams.count([[1, 2]], 32).save(tmp_path / "taken")
    from safetensors.torch import save_file

    floats = {f"{kind}{n}": torch.zeros(1) for kind in ("context", "next") for n in (1, 2)}
    save_file(floats, tmp_path / "floats.safetensors", metadata={"vocab_size": "32"})
    with pytest.raises(CheckpointError, match="expected 1-d int64 context1 and next1"):
        CorpusNgrams.load(tmp_path / "floats.safetensors", vocab_size=32)
