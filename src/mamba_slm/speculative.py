"""Prompt-lookup decoding: several tokens per pass where the text repeats itself, greedy or sampled.

The draft is what followed an earlier occurrence of the context's last n tokens (n = 3, then 2,
then 1: the longest match wins; `NgramIndex.draft` says which occurrence), as in llama.cpp's
lookup decoding and transformers' `prompt_lookup_num_tokens`; it needs no second model. The last
token and the draft go through the model in one pass. On a CPU that pass is the one-call step over
a few tokens of one row, which reads each weight once for all of them: 1.1-2.7 decode steps for
2-16 tokens (docs/benchmarks.md). The
greedy token at each position accepts the draft up to the first mismatch, and the mismatch
position's own greedy token comes free. The cache then forgets the rejected tokens
(`HybridCache.rewind`: on the C path the Mamba recurrences run again over the kept tokens from
the states and in_proj outputs the pass kept, no weights read; on the module path, a snapshot
from before the pass and a second pass over the kept tokens).

transformers refuses assisted decoding for stateful models (Mamba, Jamba, ours through `hf.py`):
their recurrent state cannot be cropped. Keeping what a rewind needs is what makes it possible here.

Where the context has no earlier match, the draft can come from a table instead: `CorpusNgrams`
holds, for each one- and two-token context, the token that most often followed it, and a draft
follows that chain for a few tokens (retrieval drafting, as in REST and llama.cpp's static n-gram
cache). What it counts as "followed" is the model's own greedy prediction at each position of some
of its training text (`predicted_ngrams`), not the text's next token: the drafts are checked
against the model's greedy choices, and a small model's choice after a context is its most likely
continuation there, which the corpus's most frequent one often is not. `mamba-slm train` writes
the table into the model directory (`lookup_ngrams.safetensors`), `mamba-slm ngrams` from any
corpus. On the built-in corpus about 40% of the trained benchmark model's passes found no earlier
match; drafts from the corpus's own next tokens gave those passes 2.3 tokens each, drafts from
the model's predictions on 65,536 of its training tokens 3.4, and lookup as a whole went from 4.74
to 5.47 tokens per pass (its greedy text after the seed's five prompts).

Sampling works the same way (as in transformers' assisted decoding with a draft that has no
probabilities): each position of the pass draws its token as plain sampling would, one position
after another, and the draft is accepted up to the first draw that differs from it. A drafted
token x is then kept with probability p(x) and otherwise replaced by a draw from p without x,
which is exactly speculative sampling's rule for a draft that proposes x for certain; and as
every yielded token takes one draw, in the order plain sampling takes them, a seeded generation
gives the very tokens plain sampling gives with that seed. The greedy pick is the same rule with
an argmax.

The tokens are the plain loop's. A pass over several tokens sums in another order than a one-token
step, so where two tokens are within float rounding of each other the pick can differ, as between
batch sizes.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from .checkpoint import CheckpointError, atomic_write
from .errors import describe
from .model.cache import HybridCache
from .model.hybrid import HybridLM
from .model.linear import MAX_ROWS

MAX_NGRAM = 3  # the longest context suffix matched; 3, 2, 1 are tried in turn
FIRST_DRAFT = 4  # the draft length to start from, and the shortest one after a miss
NGRAMS_NAME = "lookup_ngrams.safetensors"  # a model directory's corpus table
CORPUS_ORDER = 2  # contexts of up to 2 tokens: longer ones fit the corpus, not a small model's text
CORPUS_MIN_COUNT = 10  # a continuation seen fewer times is not trusted to predict the next token
PREDICTED_TOKENS = 65_536  # training tokens whose next token the model predicts for its table
PREDICTED_MIN_COUNT = 4  # a model's predictions vary less than text: fewer sightings suffice
CORPUS_DRAFT = 4  # tokens a corpus draft chains; each is likelier wrong than the one before
KEPT_MIN = 0.25  # drafts from a source whose first token is kept less often than this are not sent
KEPT_DECAY = 0.9  # the kept rate is a moving average over about the last 10 drafts


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


class CorpusNgrams:
    """For each context of 1..CORPUS_ORDER tokens in a corpus, the token that most often followed
    it, if it did at least `min_count` times; `draft` chains them, the longest known context first."""

    def __init__(self, vocab_size: int, next_token: list[dict[int, int]]) -> None:
        self.vocab_size = vocab_size
        self.next_token = next_token  # [n - 1]: context key (base-vocab_size number) -> next token

    @classmethod
    def count(
        cls,
        documents: Iterable[Sequence[int]],
        vocab_size: int,
        min_count: int = CORPUS_MIN_COUNT,
        predictions: Iterable[Sequence[int]] | None = None,
    ) -> CorpusNgrams:
        """Counted with numpy over every token id list (a context never spans two lists; `train`
        passes its packed blocks, in which EOS, a token like any other, separates documents). With
        `predictions` (one list per document, as long as it: the token predicted after each of its
        positions), what follows a context is its prediction instead of the document's next token."""
        if vocab_size ** (CORPUS_ORDER + 1) >= 2**63:
            raise ValueError(f"vocab_size {vocab_size}: too large for int64 n-gram keys")
        pairs: list[list[np.ndarray]] = [[] for _ in range(CORPUS_ORDER)]
        with_next = (
            zip(documents, predictions, strict=True)
            if predictions is not None
            else ((d, None) for d in documents)
        )
        for doc, predicted in with_next:
            ids = _token_ids(doc, vocab_size)
            follows = ids[1:] if predicted is None else _token_ids(predicted, vocab_size)  # [i]: after i
            if predicted is not None and len(follows) != len(ids):
                raise ValueError(f"{len(follows)} predictions for a document of {len(ids)} tokens")
            for n in range(1, CORPUS_ORDER + 1):
                m = len(follows) - n + 1  # contexts of n tokens that something follows
                if m > 0:  # (context, next) as one number: context * vocab + next
                    key = np.zeros(m, dtype=np.int64)
                    for j in range(n):
                        key = key * vocab_size + ids[j : j + m]
                    pairs[n - 1].append(key * vocab_size + follows[n - 1 : n - 1 + m])
        return cls(vocab_size, [_most_frequent(p, vocab_size, min_count) for p in pairs])

    def draft(self, tokens: Sequence[int], k: int) -> list[int]:
        """Up to k tokens after `tokens`: each the most frequent follower of the longest known
        context ending there, until none is known."""
        out: list[int] = []
        context = list(tokens[-CORPUS_ORDER:])
        while len(out) < k:
            for n in range(min(len(context), CORPUS_ORDER), 0, -1):
                key = 0
                for t in context[-n:]:
                    key = key * self.vocab_size + t
                token = self.next_token[n - 1].get(key)
                if token is not None:
                    break
            else:
                return out
            out.append(token)
            context = [*context[1:], token] if len(context) == CORPUS_ORDER else [*context, token]
        return out

    def __len__(self) -> int:
        return sum(len(t) for t in self.next_token)

    def save(self, path: str | Path) -> None:
        """As safetensors, written atomically (CheckpointError if the file cannot be written)."""
        tensors = {}
        for n, table in enumerate(self.next_token, 1):
            tensors[f"context{n}"] = torch.tensor(list(table), dtype=torch.int64)
            tensors[f"next{n}"] = torch.tensor(list(table.values()), dtype=torch.int64)
        meta = {"vocab_size": str(self.vocab_size)}
        try:
            atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
        except OSError as e:
            raise CheckpointError(f"{path}: cannot write the n-gram table ({e.strerror or e})") from None

    @classmethod
    def load(cls, path: str | Path, vocab_size: int) -> CorpusNgrams:
        """The table of `path`, checked against the model's vocabulary (CheckpointError if unusable)."""
        try:
            with safe_open(path, framework="pt") as f:
                table_vocab = int((f.metadata() or {})["vocab_size"])
                names = f.keys()
                tensors = {name: f.get_tensor(name) for name in names}
        except (SafetensorError, OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"{path}: not a lookup n-gram table ({describe(e)})") from None
        if table_vocab != vocab_size:
            raise CheckpointError(
                f"{path}: counted for a {table_vocab}-token vocabulary, the model has {vocab_size}"
            )
        next_token = []
        for n in range(1, CORPUS_ORDER + 1):
            keys, values = tensors.get(f"context{n}"), tensors.get(f"next{n}")
            if (
                keys is None
                or values is None
                or keys.shape != values.shape
                or keys.dim() != 1
                or keys.dtype != torch.int64
                or values.dtype != torch.int64
            ):
                raise CheckpointError(f"{path}: expected 1-d int64 context{n} and next{n} of one length")
            if len(values) and (int(values.min()) < 0 or int(values.max()) >= vocab_size):
                raise CheckpointError(f"{path}: next{n} holds a token outside the vocabulary")
            next_token.append(dict(zip(keys.tolist(), values.tolist(), strict=True)))
        return cls(vocab_size, next_token)


def predicted_ngrams(
    model: HybridLM,
    blocks: Sequence[Sequence[int]],
    max_tokens: int = PREDICTED_TOKENS,
    min_count: int = PREDICTED_MIN_COUNT,
    seed: int = 0,
) -> CorpusNgrams:
    """The table of what `model` predicts (its greedy token) after each position of up to
    `max_tokens` tokens of `blocks` (whole blocks, picked at random with `seed`), counted with
    `CorpusNgrams.count`. One forward pass per group of equal-length blocks, without gradients."""
    order = list(range(len(blocks)))
    random.Random(seed).shuffle(order)
    picked, total = [], 0
    for i in order:
        if total >= max_tokens:
            break
        if len(blocks[i]):
            picked.append(blocks[i])
            total += len(blocks[i])
    picked.sort(key=len)  # equal lengths side by side, so that they share a forward pass
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    documents, predictions = [], []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), tqdm(total=total, desc="n-gram table", unit="tok", leave=False) as bar:
            start = 0
            while start < len(picked):
                length = len(picked[start])
                end = start + 1  # at most ~4k tokens of logits at a time
                while end < len(picked) and len(picked[end]) == length and (end - start + 1) * length <= 4096:
                    end += 1
                ids = torch.tensor(picked[start:end], device=device)
                predictions += model(ids).logits.argmax(-1).cpu().tolist()
                documents += picked[start:end]
                bar.update(ids.numel())
                start = end
    finally:
        model.train(was_training)
    return CorpusNgrams.count(documents, model.config.vocab_size, min_count, predictions)


def _token_ids(tokens: Sequence[int], vocab_size: int) -> np.ndarray:
    ids = np.asarray(tokens, dtype=np.int64)
    bad = ids[(ids < 0) | (ids >= vocab_size)]
    if len(bad):
        raise ValueError(f"token id {int(bad[0])} outside the vocabulary (size {vocab_size})")
    return ids


def _most_frequent(keys: list[np.ndarray], vocab_size: int, min_count: int) -> dict[int, int]:
    """context -> its most frequent next token, from (context * vocab + next) numbers."""
    if not keys:
        return {}
    pair, count = np.unique(np.concatenate(keys), return_counts=True)
    context, token = pair // vocab_size, pair % vocab_size
    order = np.lexsort((-count, context))  # by context, the most frequent first (ties: smallest id)
    context, token, count = context[order], token[order], count[order]
    first = np.ones(len(context), dtype=bool)
    first[1:] = context[1:] != context[:-1]
    keep = first & (count >= min_count)
    return dict(zip(context[keep].tolist(), token[keep].tolist(), strict=True))


def lookup_steps(
    model: HybridLM,
    logits: Tensor,
    cache: HybridCache,
    prompt: Sequence[int],
    max_draft: int,
    max_new_tokens: int,
    corpus: CorpusNgrams | None = None,
    pick: Callable[[Tensor], Tensor] | None = None,
) -> Iterator[Tensor]:
    """The tokens of one row, one (1,) tensor at a time, after its prefill (`logits`: (1, vocab),
    the prompt's last position); drafts of up to max_draft tokens from `prompt` and the output,
    and where they have no match, of up to CORPUS_DRAFT tokens from `corpus`. pick: (1, vocab)
    logits -> (1,) token, called once for each token yielded, in order (plain sampling's step:
    its draws, its repetition penalty); None: greedy.

    The draft length adapts: doubled after a draft accepted whole, else one more than the tokens
    accepted (at least FIRST_DRAFT; sampled, at least 1). A long draft pays where the text is in a loop, and costs a
    pass of many rows where it is not: on the built-in corpus's models this gave 6-9% more tokens
    per unit of pass time than any fixed length (simulated from their greedy text and measured pass
    costs).

    A draft's source (the context, the table) is used only while its drafts' first tokens are
    kept at least KEPT_MIN of the time (a moving average): a pass of two tokens costs 1.1-1.5
    plain steps, so below that a draft costs more than it brings. While a source is paused, what
    it would have drafted is still checked against the token picked, so it resumes when its drafts
    would be kept again. Sampling at temperature 1 keeps few drafts; greedy keeps most."""
    max_draft = min(max_draft, MAX_ROWS - 1)  # the one-call step takes MAX_ROWS tokens of a row
    # A drawn token keeps a draft less often than greedy's (on the benchmark model, the first drafted
    # token 28-36% of the time at temperature 0.8-0.5, against 78%): sampled drafts start at one token.
    shortest = min(FIRST_DRAFT if pick is None else 1, max_draft)
    length = shortest
    index = NgramIndex(prompt)
    cache.keep_trail = True
    device = logits.device
    token, produced = _picked(logits, [], pick)[0], 0
    kept_rate = {"context": 1.0, "table": 1.0}
    while True:
        yield torch.tensor([token], device=device)
        produced += 1
        index.add(token)
        if produced == max_new_tokens:
            return
        # The pass yields up to len(draft) + 1 tokens; the last must still fit the budget.
        room = max_new_tokens - produced - 1
        draft, source = index.draft(min(length, room)), "context"
        if not draft and corpus is not None:
            draft, source = corpus.draft(index.tokens, min(CORPUS_DRAFT, length, room)), "table"
        guess = None
        if draft and kept_rate[source] < KEPT_MIN:
            guess, draft = draft[0], []  # not sent: only checked
        tokens = torch.tensor([[token, *draft]], device=device)
        picked = _picked(model(tokens, cache=cache).logits[0], draft, pick)
        accepted = len(picked) - 1
        rejected = len(draft) - accepted
        if draft or guess is not None:
            kept = accepted > 0 if draft else picked[0] == guess
            kept_rate[source] = KEPT_DECAY * kept_rate[source] + (1 - KEPT_DECAY) * kept
        if draft:
            length = min(2 * length, max_draft) if not rejected else max(accepted + 1, shortest)
        if rejected and not cache.rewind(rejected):  # back to before the pass: run the kept ones again
            model(tokens[:, : accepted + 1], cache=cache, num_logits_to_keep=1)
        for t in draft[:accepted]:
            yield torch.tensor([t], device=device)
            produced += 1
            index.add(t)
        token = picked[-1]


def _picked(logits: Tensor, draft: Sequence[int], pick: Callable[[Tensor], Tensor] | None) -> list[int]:
    """The tokens a pass yields: each position's pick (logits: (positions, vocab)), up to the first
    that is not the draft's, that one included."""
    greedy = logits.argmax(-1).tolist() if pick is None else None
    out: list[int] = []
    while not out or (len(out) <= len(draft) and out[-1] == draft[len(out) - 1]):
        i = len(out)
        out.append(greedy[i] if greedy is not None else int(pick(logits[i : i + 1])[0]))
    return out
