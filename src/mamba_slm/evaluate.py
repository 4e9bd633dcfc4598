"""Evaluation: perplexity of a model on packed blocks, and a unigram baseline to compare with."""

from __future__ import annotations

import math
from collections import Counter

import torch

from .model.hybrid import HybridLM


@torch.inference_mode()
def perplexity(model: HybridLM, blocks: list[list[int]], batch_size: int = 8) -> float:
    """exp(mean next-token loss) over every target token of the blocks."""
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        batch = blocks[start : start + batch_size]
        width = max(len(b) for b in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for i, b in enumerate(batch):
            ids[i, : len(b)] = torch.tensor(b)
            mask[i, : len(b)] = 1
        loss = model(ids, attention_mask=mask, labels=ids, return_logits=False).loss
        n = int((mask[:, 1:] & mask[:, :-1]).sum())
        total += loss.item() * n
        count += n
    return math.exp(total / max(count, 1))


def unigram_perplexity(train_blocks: list[list[int]], eval_blocks: list[list[int]], vocab_size: int) -> float:
    """Perplexity of an add-one-smoothed unigram model fitted on the training tokens, scored on
    the same targets `perplexity` scores (every token of a block but its first)."""
    counts = Counter(t for b in train_blocks for t in b)
    total = sum(counts.values()) + vocab_size
    nll, n = 0.0, 0
    for block in eval_blocks:
        for token in block[1:]:
            nll -= math.log((counts.get(token, 0) + 1) / total)
            n += 1
    return math.exp(nll / max(n, 1))
