"""Generation on token ids: one parallel prefill of a left-padded batch, then recurrent steps.

This first version does greedy decoding and temperature / top-k / top-p sampling with stop on
EOS; the full engine (beam and contrastive search, streaming, stop strings) builds on it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .model.hybrid import HybridLM


@dataclass
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0
    top_p: float = 1.0
    eos_token_id: int | None = None
    seed: int | None = None


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Set logits outside the top-k / nucleus (top-p) to -inf. logits: (b, vocab)."""
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits


@torch.inference_mode()
def generate(
    model: HybridLM, prompts: list[list[int]], config: SamplingConfig, pad_id: int = 0
) -> list[list[int]]:
    """New tokens for each prompt (without the prompt), stopping at EOS (kept) or max_new_tokens."""
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for i, prompt in enumerate(prompts):  # left padding: every row's last token is at the end
        ids[i, width - len(prompt) :] = torch.tensor(prompt, device=device)
        mask[i, width - len(prompt) :] = 1
    generator = torch.Generator(device=device).manual_seed(config.seed) if config.seed is not None else None
    cache = model.allocate_cache(len(prompts), capacity=width + config.max_new_tokens)
    logits = model(ids, attention_mask=mask, cache=cache, num_logits_to_keep=1).logits[:, -1]
    out: list[list[int]] = [[] for _ in prompts]
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    for _ in range(config.max_new_tokens):
        if config.temperature <= 0:
            nxt = logits.argmax(-1)
        else:
            probs = filter_logits(logits.float() / config.temperature, config.top_k, config.top_p).softmax(-1)
            nxt = torch.multinomial(probs, 1, generator=generator)[:, 0]
        for i, token in enumerate(nxt.tolist()):
            if not done[i]:
                out[i].append(token)
        if config.eos_token_id is not None:
            done |= nxt == config.eos_token_id
        if bool(done.all()):
            break
        logits = model(nxt[:, None], cache=cache).logits[:, -1]
    return out
