"""Prompt-lookup decoding: greedy tokens several at a time where the text repeats itself.

The draft is what followed an earlier occurrence of the context's last n tokens (n = 3, then 2,
then 1: the longest match wins; `NgramIndex.draft` says which occurrence), as in llama.cpp's lookup decoding and
transformers' `prompt_lookup_num_tokens`; it needs no second model. The last token and the draft
go through the model in one pass. On a CPU that pass is the one-call step over a few tokens of
one row, which reads each weight once for all of them, so it costs about one decode step. The
greedy token at each position accepts the draft up to the first mismatch, and the mismatch
position's own greedy token comes free. The cache then forgets the rejected tokens
(`HybridCache.rewind`: on the C path the Mamba recurrences run again over the kept tokens from
the states and in_proj outputs the pass kept, no weights read; on the module path, a snapshot
from before the pass and a second pass over the kept tokens).

transformers refuses assisted decoding for stateful models (Mamba, Jamba, ours through `hf.py`):
their recurrent state cannot be cropped. Keeping what a rewind needs is what makes it possible here.

The tokens are greedy's. A pass over several tokens sums in another order than a one-token step,
so where two tokens are within float rounding of each other the pick can differ, as between
batch sizes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from .model.cache import HybridCache
from .model.hybrid import HybridLM
from .model.linear import MAX_ROWS

MAX_NGRAM = 3  # the longest context suffix matched; 3, 2, 1 are tried in turn
FIRST_DRAFT = 4  # the draft length to start from, and the shortest one after a miss


class NgramIndex:
    """Where each n-gram (n <= MAX_NGRAM) of a growing token list ended, counting only
    occurrences that a token follows: a lookup never finds the context's own suffix."""

    def __init__(self, tokens: Sequence[int]) -> None:
        self.tokens: list[int] = []
        self.ends: dict[tuple[int, ...], list[int]] = {}
        for t in tokens:
            self.add(t)

    def add(self, token: int) -> None:
        last = len(self.tokens) - 1  # now followed by `token`
        for n in range(1, MAX_NGRAM + 1):
            if last - n + 1 >= 0:
                self.ends.setdefault(tuple(self.tokens[last - n + 1 : last + 1]), []).append(last)
        self.tokens.append(token)

    def draft(self, k: int) -> list[int]:
        """Up to k tokens that followed an earlier match of the longest suffix that has one: the
        latest match with k tokens after it (the most recent text is the likeliest to repeat),
        else the earliest (the most tokens after it; in a loop the latest overlaps the suffix)."""
        for n in range(min(MAX_NGRAM, len(self.tokens)), 0, -1):
            ends = self.ends.get(tuple(self.tokens[-n:]))
            if ends:
                full = (e for e in reversed(ends[-8:]) if e + k < len(self.tokens))
                end = next(full, ends[0])
                return self.tokens[end + 1 : end + 1 + k]
        return []


def lookup_steps(
    model: HybridLM,
    logits: Tensor,
    cache: HybridCache,
    prompt: Sequence[int],
    max_draft: int,
    max_new_tokens: int,
) -> Iterator[Tensor]:
    """Greedy tokens of one row, one (1,) tensor at a time, after its prefill (`logits`: (1, vocab),
    the prompt's last position); drafts of up to max_draft tokens from `prompt` and the output.

    The draft length adapts: doubled after a draft accepted whole, else one more than the tokens
    accepted (at least FIRST_DRAFT). A long draft pays where the text is in a loop, and costs a
    pass of many rows where it is not: on the built-in corpus's models this gave 6-9% more tokens
    per unit of pass time than any fixed length (simulated from their greedy text and measured pass
    costs)."""
    max_draft = min(max_draft, MAX_ROWS - 1)  # the one-call step takes MAX_ROWS tokens of a row
    length = min(FIRST_DRAFT, max_draft)
    index = NgramIndex(prompt)
    cache.keep_trail = True
    device = logits.device
    token, produced = int(logits[0].argmax()), 0
    while True:
        yield torch.tensor([token], device=device)
        produced += 1
        index.add(token)
        if produced == max_new_tokens:
            return
        # The pass yields up to len(draft) + 1 tokens; the last must still fit the budget.
        draft = index.draft(min(length, max_new_tokens - produced - 1))
        tokens = torch.tensor([[token, *draft]], device=device)
        greedy = model(tokens, cache=cache).logits[0].argmax(-1).tolist()
        accepted = 0
        while accepted < len(draft) and greedy[accepted] == draft[accepted]:
            accepted += 1
        rejected = len(draft) - accepted
        if draft:
            length = (
                min(2 * length, max_draft) if not rejected else max(accepted + 1, min(FIRST_DRAFT, max_draft))
            )
        if rejected and not cache.rewind(rejected):  # back to before the pass: run the kept ones again
            model(tokens[:, : accepted + 1], cache=cache, num_logits_to_keep=1)
        for t in draft[:accepted]:
            yield torch.tensor([t], device=device)
            produced += 1
            index.add(t)
        token = greedy[accepted]
