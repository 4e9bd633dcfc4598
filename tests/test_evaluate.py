"""Perplexity and the unigram baseline."""

import math

import torch

from mamba_slm import HybridLM, ModelConfig
from mamba_slm.evaluate import perplexity, unigram_perplexity


def test_perplexity_matches_the_model_loss():
    torch.manual_seed(0)
    model = HybridLM(ModelConfig.from_preset("tiny")).eval()
    blocks = [torch.randint(0, 256, (17,)).tolist() for _ in range(3)]
    with torch.no_grad():
        loss = model(torch.tensor(blocks), labels=torch.tensor(blocks)).loss.item()
    assert math.isclose(perplexity(model, blocks, batch_size=2), math.exp(loss), rel_tol=1e-5)
    # an untrained model is close to uniform over the vocabulary
    assert 150 < perplexity(model, blocks) < 400


def test_unigram_perplexity():
    train = [[1, 1, 2, 3]]
    # counts+1 over vocab 4: token 1 -> 3/8, 2 -> 2/8, 3 -> 2/8, 0 -> 1/8; targets are b[1:]
    ppl = unigram_perplexity(train, [[0, 1, 2]], vocab_size=4)
    assert math.isclose(ppl, math.exp(-(math.log(3 / 8) + math.log(2 / 8)) / 2))
