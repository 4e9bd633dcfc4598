"""Generation: greedy equals an argmax loop, sampling respects top-k/top-p, seeds, padding, EOS."""

import torch

from mamba_slm import HybridLM, ModelConfig
from mamba_slm.generation import SamplingConfig, filter_logits, generate


def tiny():
    torch.manual_seed(0)
    return HybridLM(ModelConfig.from_preset("tiny")).eval()


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


def test_seeded_sampling_is_reproducible_and_stops_at_eos():
    model = tiny()
    cfg = SamplingConfig(max_new_tokens=20, temperature=1.0, top_p=0.9, seed=7)
    assert generate(model, [[1, 2, 3]], cfg) == generate(model, [[1, 2, 3]], cfg)
    first = generate(model, [[1, 2, 3]], cfg)[0]
    eos = first[4]
    stopped = generate(model, [[1, 2, 3]], SamplingConfig(**{**cfg.__dict__, "eos_token_id": eos}))[0]
    assert stopped[-1] == eos and len(stopped) == first.index(eos) + 1


def test_filters_keep_only_allowed_tokens():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    top5 = filter_logits(logits, top_k=5)
    assert ((top5 > float("-inf")).sum(-1) == 5).all()
    nucleus = filter_logits(logits, top_p=0.5)
    for row, kept in zip(logits.softmax(-1), nucleus > float("-inf"), strict=True):
        kept_mass = row[kept].sum()
        assert kept_mass >= 0.5 and kept_mass - row[kept].min() < 0.5  # the smallest such set
    draws = torch.multinomial(nucleus.softmax(-1), 500, replacement=True)
    assert torch.gather(nucleus > float("-inf"), 1, draws).all()
