"""Search strategies beyond sampling: contrastive search and beam search.

Both work on a prefilled `HybridCache` and use its row operations instead of running prefixes
again: contrastive search runs its top-k candidates as k extra rows for one step and keeps the
winner (`select_rows`); beam search reorders the rows after every step. `Engine` (generation.py)
does the prefill and turns the results into `Completion`s.

Contrastive search (Su et al. 2022, "A Contrastive Framework for Neural Text Generation"):
among the top_k most likely tokens, pick argmax (1 - alpha) p(v) - alpha max_j cos(h_v, h_j),
where h are the model's final hidden states and j runs over the context (prompt and output).
Beam search keeps `num_beams` live beams and up to `num_beams` finished hypotheses per prompt,
scored by log-probability sum / generated_length ** length_penalty, as transformers does.
Both apply the repetition penalty (`RepetitionPenalty`, which sampling uses too) to the logits
before scoring, and its record of seen tokens follows the rows as they are reordered.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from .model.cache import HybridCache
from .model.hybrid import HybridLM

Hypotheses = list[tuple[float, list[int]]]  # (score, tokens), at most num_beams of them


def penalize_repetition(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL's repetition penalty: divide positive logits of seen tokens by `penalty`, multiply negative ones."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


class RepetitionPenalty:
    """The repetition penalty over what each row has seen: its prompt (padding excluded) and output."""

    def __init__(self, tokens: Tensor, mask: Tensor, vocab: int, penalty: float) -> None:
        # Count, then compare: a scatter of booleans would let a padding slot overwrite a real
        # occurrence of the same id (duplicate indices in one scatter have no defined order).
        counts = torch.zeros(tokens.shape[0], vocab, dtype=torch.long, device=tokens.device)
        self.seen = counts.scatter_add_(1, tokens, mask.long()) > 0
        self.penalty = penalty

    def __call__(self, logits: Tensor) -> Tensor:
        return penalize_repetition(logits, self.seen, self.penalty)

    def add(self, tokens: Tensor) -> None:
        """tokens: (rows,), each row's new token."""
        self.seen.scatter_(1, tokens[:, None], True)

    def select_rows(self, rows: Tensor) -> None:
        self.seen = self.seen[rows]


def contrastive_steps(
    model: HybridLM,
    logits: Tensor,
    cache: HybridCache,
    hidden: Tensor,
    mask: Tensor,
    top_k: int,
    alpha: float,
    max_new_tokens: int,
    penalty: RepetitionPenalty | None = None,
) -> Iterator[Tensor]:
    """Yield (b,) next tokens. logits: (b, V) after the prompt; hidden: (b, t, d) the prompt's final
    hidden states; mask: (b, t), 0 on left padding (never part of the context)."""
    rows, device = logits.shape[0], logits.device
    top_k = min(top_k, logits.shape[-1])
    context = F.normalize(hidden.float(), dim=-1)  # (b, t, d) unit vectors
    context_ok = mask.bool()
    row_ids = torch.arange(rows, device=device)
    for step in range(max_new_tokens):
        if penalty is not None:
            logits = penalty(logits)
        top_prob, top_token = logits.softmax(-1).topk(top_k, dim=-1)  # (b, k)
        cache.select_rows(row_ids.repeat_interleave(top_k))  # every candidate gets its own row
        out = model(top_token.reshape(-1, 1), cache=cache, output_hidden_states=True)
        h = F.normalize(out.hidden_states[:, -1].float(), dim=-1).view(rows, top_k, -1)  # (b, k, d)
        similarity = torch.einsum("bkd,btd->bkt", h, context).masked_fill(~context_ok[:, None], -2.0)
        score = (1 - alpha) * top_prob - alpha * similarity.amax(-1)  # (b, k)
        best = score.argmax(-1)  # (b,)
        chosen_token = top_token.gather(1, best[:, None])[:, 0]
        yield chosen_token
        if step + 1 == max_new_tokens:
            return
        if penalty is not None:
            penalty.add(chosen_token)
        chosen = row_ids * top_k + best
        cache.select_rows(chosen)
        logits = out.logits[:, -1].float()[chosen]
        context = torch.cat([context, h[row_ids, best][:, None]], 1)
        context_ok = F.pad(context_ok, (0, 1), value=True)


def beam_search(
    model: HybridLM,
    logits: Tensor,
    cache: HybridCache,
    num_beams: int,
    max_new_tokens: int,
    stop_ids: set[int],
    length_penalty: float = 1.0,
    early_stopping: bool = True,
    pad_id: int = 0,
    cancel: threading.Event | None = None,
    penalty: RepetitionPenalty | None = None,
    stops: Callable[[list[int]], bool] | None = None,
) -> list[Hypotheses]:
    """Per prompt, up to num_beams (score, tokens) hypotheses (unsorted). logits: (b, V) after the
    prompt; the cache holds b prefilled rows and is expanded to b * num_beams. A set `cancel` ends
    the search after the current step, as running out of steps would. `stops(tokens)`: whether
    these new tokens end in a stop (a stop string); such a candidate finishes like a stop id."""
    nb, batch, device = num_beams, logits.shape[0], logits.device
    cache.expand_rows(nb)
    logits = logits.float().repeat_interleave(nb, 0)  # (b*nb, V)
    if penalty is not None:
        penalty.select_rows(torch.arange(batch, device=device).repeat_interleave(nb))
        logits = penalty(logits)
    logprobs = logits.log_softmax(-1)
    vocab = logprobs.shape[-1]
    beam_scores = torch.full((batch, nb), float("-inf"), device=device)
    beam_scores[:, 0] = 0.0  # the beams start identical: expand only the first at step one
    tokens = torch.empty(batch * nb, 0, dtype=torch.long, device=device)
    finished: list[Hypotheses] = [[] for _ in range(batch)]
    done = [False] * batch
    width = min(2 * nb, nb * vocab)  # 2 x beams: enough live candidates even if nb of them stop
    for step in range(max_new_tokens):
        length = step + 1
        candidates = (beam_scores.reshape(-1, 1) + logprobs).view(batch, nb * vocab)
        top_scores, top_index = candidates.topk(width, dim=1)
        next_scores = torch.full((batch, nb), float("-inf"), device=device)
        next_beam = torch.zeros(batch, nb, dtype=torch.long, device=device)
        next_token = torch.full((batch, nb), pad_id, dtype=torch.long, device=device)
        for b in range(batch):
            if done[b]:
                continue
            kept = 0
            for rank, (score, index) in enumerate(
                zip(top_scores[b].tolist(), top_index[b].tolist(), strict=True)
            ):
                beam, token = divmod(index, vocab)
                seq = tokens[b * nb + beam].tolist() + [token] if stops is not None else None
                if token in stop_ids or (stops is not None and stops(seq)):
                    if rank < nb and score > float("-inf"):
                        seq = seq or tokens[b * nb + beam].tolist() + [token]
                        add_hypothesis(finished[b], nb, score / length**length_penalty, seq)
                    continue
                next_scores[b, kept], next_beam[b, kept], next_token[b, kept] = score, beam, token
                kept += 1
                if kept == nb:
                    break
            best_live = next_scores[b].max().item() / length**length_penalty
            done[b] = len(finished[b]) == nb and (
                early_stopping or min(h[0] for h in finished[b]) >= best_live
            )
        rows = (torch.arange(batch, device=device)[:, None] * nb + next_beam).reshape(-1)
        tokens = torch.cat([tokens[rows], next_token.reshape(-1, 1)], 1)
        if all(done) or step + 1 == max_new_tokens or (cancel is not None and cancel.is_set()):
            break
        cache.select_rows(rows)
        beam_scores = next_scores
        logits = model(next_token.reshape(-1, 1), cache=cache).logits[:, -1].float()
        if penalty is not None:
            penalty.select_rows(rows)
            penalty.add(next_token.reshape(-1))
            logits = penalty(logits)
        logprobs = logits.log_softmax(-1)
    for b in range(batch):  # out of steps: the live beams compete with the finished hypotheses
        if not done[b]:
            for j in range(nb):
                score = next_scores[b, j].item()
                if score > float("-inf"):
                    seq = tokens[b * nb + j].tolist()
                    add_hypothesis(finished[b], nb, score / len(seq) ** length_penalty, seq)
    return finished


def add_hypothesis(hyps: Hypotheses, size: int, score: float, seq: list[int]) -> None:
    """Keep the `size` best hypotheses."""
    hyps.append((score, seq))
    if len(hyps) > size:
        hyps.remove(min(hyps, key=lambda h: h[0]))
