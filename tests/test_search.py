"""Beam search and contrastive search against direct, cache-free implementations."""

import itertools
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from mamba_slm import HybridLM, ModelConfig
from mamba_slm.generation import Engine, GenerationConfig
from mamba_slm.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(["The quick brown fox jumps over the lazy dog. " * 8], vocab_size=300)


def tiny(vocab_size: int = 256):
    torch.manual_seed(0)
    return HybridLM(ModelConfig.from_preset("tiny", vocab_size=vocab_size)).eval()


def test_one_beam_equals_greedy():
    model = tiny()
    prompts = [[5, 17, 99, 3], [200, 1]]
    greedy = Engine(model).generate(prompts, GenerationConfig(max_new_tokens=12, temperature=0))
    beam = Engine(model).generate(prompts, GenerationConfig(max_new_tokens=12, num_beams=1, temperature=0))
    assert [c.tokens for c in beam] == [c.tokens for c in greedy]


def test_beam_search_with_every_prefix_kept_finds_the_exhaustive_best():
    vocab, steps, prompt = 5, 3, [1, 2, 3]
    model = tiny(vocab)
    beams = vocab ** (steps - 1)  # room for every prefix: nothing is pruned
    out = Engine(model).generate([prompt], GenerationConfig(max_new_tokens=steps, num_beams=beams))[0]
    sequences = torch.tensor([prompt + list(s) for s in itertools.product(range(vocab), repeat=steps)])
    with torch.no_grad():
        logprobs = model(sequences).logits.float().log_softmax(-1)
    new = sequences[:, len(prompt) :]
    scores = logprobs[:, len(prompt) - 1 : -1].gather(2, new[..., None])[..., 0].sum(1) / steps
    best = scores.argmax()
    assert out.tokens == new[best].tolist()
    assert abs(out.score - scores[best].item()) < 1e-4


def test_beam_search_matches_transformers_on_the_same_weights():
    from mamba_slm.hf import MambaSLMForCausalLM

    model = tiny()
    hf = MambaSLMForCausalLM.from_core(model).eval()
    prompt = [5, 17, 99, 3]
    for eos in (None, 7):
        cfg = GenerationConfig(max_new_tokens=8, num_beams=4, eos_token_id=eos, num_return_sequences=2)
        ours = Engine(model).generate([prompt], cfg)
        with torch.no_grad():
            theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=8, num_beams=4, do_sample=False,
                                 eos_token_id=eos, pad_token_id=0, num_return_sequences=2,
                                 early_stopping=True, length_penalty=1.0)  # fmt: skip
        assert ours[0].tokens == theirs[0, len(prompt) :].tolist()


def contrastive_direct(model, prompt, k, alpha, steps):
    """The scoring formula, evaluated with full forward passes and no cache."""
    ids = list(prompt)
    for _ in range(steps):
        with torch.no_grad():
            out = model(torch.tensor([ids]), output_hidden_states=True)
        probs = out.logits[0, -1].float().softmax(-1)
        context = F.normalize(out.hidden_states[0].float(), dim=-1)  # (t, d)
        best, best_score = None, -float("inf")
        for p, v in zip(*probs.topk(k), strict=True):
            with torch.no_grad():
                h = model(torch.tensor([ids + [v.item()]]), output_hidden_states=True).hidden_states[0, -1]
            penalty = (F.normalize(h.float(), dim=-1) @ context.T).max()
            score = (1 - alpha) * p - alpha * penalty
            if score > best_score:
                best, best_score = v.item(), score
        ids.append(best)
    return ids[len(prompt) :]


def test_contrastive_search_matches_the_direct_formula_also_in_a_padded_batch():
    model = tiny()
    prompts = [[5, 17, 99, 3, 42], [8, 8]]
    cfg = GenerationConfig(max_new_tokens=8, penalty_alpha=0.6, top_k=4)
    out = Engine(model).generate(prompts, cfg)
    for prompt, completion in zip(prompts, out, strict=True):
        assert completion.tokens == contrastive_direct(model, prompt, 4, 0.6, 8)


def test_beam_and_contrastive_search_apply_the_repetition_penalty():
    model, prompt = tiny(), [[7, 7, 7, 9]]
    beam, contrastive = (
        GenerationConfig(max_new_tokens=30, num_beams=3),
        GenerationConfig(max_new_tokens=30, penalty_alpha=0.6, top_k=4),
    )
    for cfg in (beam, contrastive):
        plain = Engine(model).generate(prompt, cfg)[0]
        penalised = Engine(model).generate(prompt, replace(cfg, repetition_penalty=5.0))[0]
        assert penalised.tokens != plain.tokens
        if cfg is beam:  # this beam run ends in one token repeated; the penalty breaks the loop
            assert len(set(penalised.tokens)) > len(set(plain.tokens))


def test_beam_search_ends_a_hypothesis_at_a_stop_string(tokenizer):
    engine = Engine(tiny(len(tokenizer)), tokenizer)
    cfg = GenerationConfig(max_new_tokens=20, num_beams=3, num_return_sequences=3)
    free = engine.generate(["The quick"], cfg)
    stop = free[0].text[4:6]
    for c in engine.generate(["The quick"], replace(cfg, stop_strings=(stop,))):
        assert stop not in c.text and tokenizer.decode(c.tokens, skip_special_tokens=True) == c.text
    # every token's text is a stop string: each candidate of the first step finishes at once
    every = tuple({tokenizer.decode([t]) for t in range(len(tokenizer))} - {""})
    for c in engine.generate(["The quick"], replace(cfg, stop_strings=every)):
        assert (c.text, c.finish_reason, c.tokens) == ("", "stop", [])


def test_contrastive_search_takes_a_top_k_beyond_the_vocabulary():
    out = Engine(tiny(16)).generate(
        [[1, 2]], GenerationConfig(max_new_tokens=4, penalty_alpha=0.5, top_k=500)
    )
    assert len(out[0].tokens) == 4
