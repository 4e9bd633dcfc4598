"""The generation engine: token ids in, token ids (and text) out.

`Engine` runs one parallel prefill of a left-padded batch, then recurrent decode steps with the
model's `HybridCache`. Every strategy is a loop over that cache:

  * sampling (`_sample_steps`): greedy, temperature, top-k, top-p, min-p, repetition penalty,
    `n` samples per prompt from one prefill (`HybridCache.expand_rows`), a seeded generator;
  * contrastive search and beam search (`search.py`), on the same prefilled cache.

Sampling and contrastive search are generators of next-token tensors, consumed by one
`_Collector` that applies stop token ids, stop strings and cancellation, so `generate` (a batch
of completions) and `stream` (text deltas of one completion) share the loop. Stop tokens are
kept in `tokens` (as transformers does) and never appear in `text`; stop strings end the text
before them. The per-step Python work is a few tensor ops; plain greedy decoding runs chunks of
GREEDY_CHUNK steps in one call of the C kernels (`HybridLM.decode_greedy`), with no Python between
them; a stop-string check decodes only the tail of the row. Many prompts run in batches of similar length (on a CPU, 16 rows: the most the
one-call decode step takes); the key/value buffers start with room for `KV_ROOM` new tokens and
grow by doubling, so a generous `max_new_tokens` costs nothing until it is used.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch
from torch import Tensor

from .errors import describe
from .model.cache import HybridCache
from .model.hybrid import HybridLM
from .model.linear import MAX_ROWS
from .search import RepetitionPenalty, beam_search, contrastive_steps, penalize_repetition  # noqa: F401 (public here too)
from .speculative import NGRAMS_NAME, CorpusNgrams, lookup_steps

# top-p looks for the nucleus among this many likeliest tokens, then this many, then sorts them all
NUCLEUS_CANDIDATES = (128, 1024)
# plain greedy decoding's steps per call of the C kernels (`HybridLM.decode_greedy`); fewer with
# stop strings, which are checked between calls (the steps past one are wasted), and in `stream`,
# whose text then arrives every few tokens rather than in bursts
GREEDY_CHUNK, GREEDY_CHUNK_SHORT = 16, 4
KV_ROOM = 1024  # new tokens the first KV allocation holds beyond the prompt
GPU_ROWS = 256  # default rows of a batch on a GPU: enough to fill it for small models, bounded memory


class GenerationError(ValueError):
    """Bad generation settings or prompts (one line, names the setting)."""


@dataclass
class GenerationConfig:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0  # drop tokens below min_p x the most likely token's probability
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or output
    eos_token_id: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    num_return_sequences: int = 1  # samples (or beams returned) per prompt
    num_beams: int = 1
    length_penalty: float = 1.0  # beam score = log-prob sum / generated_length ** length_penalty
    early_stopping: bool = True  # beam search ends once num_beams hypotheses are finished
    penalty_alpha: float = 0.0  # > 0 with top_k > 1: contrastive search
    seed: int | None = None
    prompt_lookup: int = 0  # > 0: drafts of up to this many tokens per pass (speculative.py)

    def __post_init__(self) -> None:
        checks = [
            ("max_new_tokens", self.max_new_tokens >= 1, "at least 1"),
            ("temperature", self.temperature >= 0, ">= 0"),
            ("top_k", self.top_k >= 0, ">= 0"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("min_p", 0 <= self.min_p < 1, "in [0, 1)"),
            ("repetition_penalty", self.repetition_penalty > 0, "> 0"),
            ("num_return_sequences", self.num_return_sequences >= 1, "at least 1"),
            ("num_beams", self.num_beams >= 1, "at least 1"),
            ("penalty_alpha", 0 <= self.penalty_alpha <= 1, "in [0, 1]"),
            (
                "prompt_lookup",
                isinstance(self.prompt_lookup, int) and self.prompt_lookup >= 0,
                "an integer >= 0",
            ),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise GenerationError(f"{name}: expected {expected}, got {getattr(self, name)!r}")
        if self.num_beams > 1 and self.num_return_sequences > self.num_beams:
            raise GenerationError(
                f"num_return_sequences: at most num_beams ({self.num_beams}), got {self.num_return_sequences}"
            )
        if self.num_beams > 1 and self.penalty_alpha > 0:
            raise GenerationError("penalty_alpha: contrastive search and beam search cannot be combined")
        if self.penalty_alpha > 0 and self.top_k < 2:
            raise GenerationError(f"top_k: contrastive search needs at least 2 candidates, got {self.top_k}")
        if self.penalty_alpha > 0 and self.num_return_sequences > 1:
            raise GenerationError(
                "num_return_sequences: contrastive search is deterministic, one sequence per prompt; "
                f"got {self.num_return_sequences}"
            )
        if self.prompt_lookup and (
            self.strategy not in ("greedy", "sample") or self.num_return_sequences > 1
        ):
            raise GenerationError(
                "prompt_lookup: greedy decoding or sampling, one sequence per prompt (no beam search, "
                "no contrastive search)"
            )
        self.stop_token_ids = tuple(self.stop_token_ids)
        self.stop_strings = tuple(s for s in self.stop_strings if s)

    @property
    def stop_ids(self) -> tuple[int, ...]:
        extra = () if self.eos_token_id is None else (self.eos_token_id,)
        return tuple(dict.fromkeys(self.stop_token_ids + extra))

    @property
    def strategy(self) -> str:
        if self.num_beams > 1:
            return "beam"
        if self.penalty_alpha > 0:
            return "contrastive"
        return "greedy" if self.temperature == 0 else "sample"


SamplingConfig = GenerationConfig  # the first version's name


@dataclass
class Completion:
    tokens: list[int]  # new tokens (stop token included when it ended the completion)
    text: str | None = None  # decoded without special tokens, cut before a stop string
    finish_reason: str = "length"  # "stop" | "length" | "cancelled"
    prompt_index: int = 0
    score: float | None = None  # beam search: length-normalised log-probability
    prompt_tokens: int = 0


# ---------------------------------------------------------------------------- logits processing
def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> Tensor:
    """Set logits outside the top-k / nucleus (top-p) / min-p set to -inf. logits: (b, vocab)."""
    values, order = candidates(logits, top_k, top_p, min_p)
    if order is None:
        return values
    # amax: a padded row's spare slots all name token 0 with -inf, which must not hide token 0's value
    return torch.full_like(logits, float("-inf")).scatter_reduce_(1, order, values, "amax")


def candidates(
    logits: Tensor, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0
) -> tuple[Tensor, Tensor | None]:
    """What the filters keep, applied in turn (top-k, then the nucleus of what is left, then min-p):
    (values, order), each row's candidate logits (-inf where dropped) and their token ids (b, k),
    likeliest first; order is None where the candidates are the whole vocabulary in id order. A row
    may end in spare slots of value -inf (naming token 0).

    The nucleus is looked for among the 128, then the 1,024 likeliest tokens (top-k: 23 and 43 us
    for 8,192 logits here) before the whole vocabulary is sorted (360 us, a fifth of the benchmark
    model's decode step): the briefly trained benchmark model's nucleus at temperature 0.8, top-p
    0.9 had 158 tokens at the median and more than 1,024 in about a sixth of its steps; in a batch,
    only the rows whose nucleus is longer are sorted. Sampling then draws among the candidates only."""
    vocab = logits.shape[-1]
    values, order = logits, None
    if 0 < top_k < vocab:
        values, order = torch.topk(logits, top_k)
    if top_p < 1.0:
        log_total = values.logsumexp(-1, keepdim=True)
        if order is None:
            values, order = _likeliest(logits, log_total, top_p)
        probs = (values - log_total).exp()
        drop = probs.cumsum(-1) - probs > top_p  # the mass before a token already reaches top_p
        values = values.masked_fill(drop, float("-inf"))
    if min_p > 0:
        probs = values.softmax(-1)
        values = values.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), float("-inf"))
    return values, order


def _likeliest(logits: Tensor, log_total: Tensor, top_p: float) -> tuple[Tensor, Tensor]:
    """Each row's likeliest tokens, likeliest first, enough of them to hold more than top_p of the
    probability: (values, order), the rows that need fewer padded with -inf."""
    vocab = logits.shape[-1]
    enough = None
    for k in (c for c in NUCLEUS_CANDIDATES if c < vocab):
        values, order = torch.topk(logits, k)
        enough = (values - log_total).exp().sum(-1) > top_p
        if bool(enough.all()):
            return values, order
    if enough is None or not bool(enough.any()):
        return torch.sort(logits, descending=True)
    short = ~enough  # the rows to sort whole
    padded_values = torch.full_like(logits, float("-inf"))
    padded_order = torch.zeros_like(logits, dtype=torch.long)
    padded_values[:, :k], padded_order[:, :k] = values, order
    padded_values[short], padded_order[short] = torch.sort(logits[short], descending=True)
    return padded_values, padded_order


def draw(probs: Tensor, generator: torch.Generator | None) -> Tensor:
    """(rows, vocab) probabilities, each row's sum need not be 1 -> (rows,) tokens, by inverting the
    cumulative distribution at one uniform number per row. `torch.multinomial` draws one
    exponential per token of the vocabulary instead: 183 against 13 us for 8,192 tokens here."""
    wide = torch.float32 if probs.device.type == "mps" else torch.float64  # MPS has no float64
    cdf = probs.to(wide).cumsum(-1)  # float64: 8,192 fp32 partial sums would drift by ~1e-6
    total = cdf[:, -1:]
    u = torch.rand(total.shape, dtype=wide, device=probs.device, generator=generator)
    # u < 1, but u * total can round up to total: stay below it, where some token's cdf is larger
    at = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, at, right=True)[:, 0]  # the first token whose cdf exceeds `at`


def next_tokens(logits: Tensor, config: GenerationConfig, generator: torch.Generator | None) -> Tensor:
    """(rows, vocab) logits -> (rows,) next tokens: argmax, or a draw from the filtered distribution."""
    if config.temperature == 0:
        return logits.argmax(-1)
    values, order = candidates(logits.float() / config.temperature, config.top_k, config.top_p, config.min_p)
    drawn = draw(values.softmax(-1), generator)
    return drawn if order is None else order.gather(1, drawn[:, None])[:, 0]


class _Pick:
    """One sampling step's choice for every row: the repetition penalty over what the rows have
    seen, then `next_tokens`; what it picks is seen from then on. Prompt lookup calls it once per
    token as the plain loop does, so both draw the same numbers from `generator`."""

    def __init__(
        self, config: GenerationConfig, generator: torch.Generator | None, penalty: RepetitionPenalty | None
    ) -> None:
        self.config, self.generator, self.penalty = config, generator, penalty

    def __call__(self, logits: Tensor) -> Tensor:
        """(rows, vocab) -> (rows,)"""
        if self.penalty is not None:
            logits = self.penalty(logits)
        tokens = next_tokens(logits, self.config, self.generator)
        if self.penalty is not None:
            self.penalty.add(tokens)
        return tokens


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(ids, mask), both (b, longest); every row's last token is at the end."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt) :] = torch.as_tensor(list(prompt), dtype=torch.long)
        mask[i, width - len(prompt) :] = 1
    return ids.to(device), mask.to(device)


# ---------------------------------------------------------------------------- stop handling
@dataclass
class _Row:
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_at: int | None = None  # character index where a stop string starts


class _Stops:
    """A config's stop token ids and stop strings, applied to one row's new tokens."""

    def __init__(self, config: GenerationConfig, tokenizer) -> None:
        self.ids = set(config.stop_ids)
        self.strings = config.stop_strings
        if self.strings and tokenizer is None:
            raise GenerationError("stop_strings: need a tokenizer to decode the text")
        self.tokenizer = tokenizer
        # Enough tokens to hold the longest stop string even at one byte per token, plus a partial char.
        self.tail = max((len(s.encode()) for s in self.strings), default=0) + 4

    def hits_string(self, tokens: list[int]) -> bool:
        """Whether the text of the last tokens holds a stop string (only the tail is decoded)."""
        tail = self.tokenizer.decode(tokens[-self.tail :], skip_special_tokens=True)
        return any(s in tail for s in self.strings)

    def cut(self, tokens: list[int]) -> tuple[list[int], str | None, bool]:
        """(tokens, text, whether a stop string cut them). The text leaves out a final stop token
        (kept in tokens, as transformers does) and ends before the first stop string, whose
        tokens are dropped."""
        if self.tokenizer is None:
            return tokens, None, False
        shown = tokens[:-1] if tokens and tokens[-1] in self.ids else tokens
        text = self.tokenizer.decode(shown, skip_special_tokens=True)
        cut = min((k for k in (text.find(s) for s in self.strings) if k >= 0), default=-1)
        if cut < 0:
            return tokens, text, False
        while tokens and len(self.tokenizer.decode(tokens, skip_special_tokens=True)) > cut:
            tokens = tokens[:-1]
        return tokens, text[:cut], True


class _Collector:
    """Applies stop ids, stop strings and cancellation to a stream of (rows,) next-token tensors."""

    def __init__(self, rows: int, config: GenerationConfig, tokenizer) -> None:
        self.rows = [_Row() for _ in range(rows)]
        self.stops = _Stops(config, tokenizer)
        self.active = list(range(rows))

    def add(self, step_tokens: Tensor) -> bool:
        """Record one step; True when every row has finished."""
        values = step_tokens.tolist()
        still = []
        for i in self.active:
            row, token = self.rows[i], values[i]
            row.tokens.append(token)
            if token in self.stops.ids or (self.stops.strings and self.stops.hits_string(row.tokens)):
                row.finish_reason = "stop"
            else:
                still.append(i)
        self.active = still
        return not still

    def finish(self, reason: str) -> None:
        for i in self.active:
            self.rows[i].finish_reason = reason
        self.active = []

    def completion(self, i: int) -> Completion:
        row = self.rows[i]
        tokens, text, _ = self.stops.cut(row.tokens)
        return Completion(list(tokens), text, row.finish_reason or "length")


# ---------------------------------------------------------------------------- the engine
class Engine:
    """Batched generation over a `HybridLM` (token ids in, `Completion`s out; text when given a tokenizer)."""

    def __init__(
        self,
        model: HybridLM,
        tokenizer=None,
        compile: bool = False,
        kv_cache_dtype: torch.dtype | None = None,
        ngrams: CorpusNgrams | Path | None = None,
    ) -> None:
        """kv_cache_dtype: the attention layers' cached keys and values (default: the model's dtype);
        bf16 halves what a long context stores and reads per step, at bf16 precision (on a CPU the
        one-call decode step reads fp32 and bf16 caches; other dtypes take the module path).
        ngrams: a corpus's n-gram table, which prompt lookup drafts from where the text has no match,
        or its file, read the first time prompt lookup needs it (so that a stale one never stops
        generation without lookup)."""
        if kv_cache_dtype is not None and not (
            isinstance(kv_cache_dtype, torch.dtype) and kv_cache_dtype.is_floating_point
        ):
            raise GenerationError(
                f"kv_cache_dtype: expected a floating-point torch dtype, got {kv_cache_dtype!r}"
            )
        self.model = model  # in eval mode while it generates, its own mode restored after (_evaluating)
        self.kv_cache_dtype = kv_cache_dtype
        self.ngrams = ngrams
        if compile:  # opt-in: a compiled decode step per Mamba block (HybridLM.compile_decode)
            model.compile_decode("reduce-overhead" if next(model.parameters()).is_cuda else None)
        self.tokenizer = tokenizer
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = pad if pad is not None else (model.config.pad_token_id or 0)
        self.device = next(model.parameters()).device

    @property
    def ngrams(self) -> CorpusNgrams | None:
        if isinstance(self._ngrams, Path):
            self._ngrams = CorpusNgrams.load(self._ngrams, self.model.config.vocab_size)
        return self._ngrams

    @ngrams.setter
    def ngrams(self, table: CorpusNgrams | Path | None) -> None:
        vocab = self.model.config.vocab_size
        if isinstance(table, CorpusNgrams) and table.vocab_size != vocab:
            raise GenerationError(
                f"ngrams: counted for a {table.vocab_size}-token vocabulary, the model has {vocab}"
            )
        self._ngrams = table

    def default_config(self, **overrides) -> GenerationConfig:
        """A config whose stop tokens are the model's EOS (and the chat end-of-turn token, if any)."""
        stop = [self.model.config.eos_token_id]
        if self.tokenizer is not None:
            stop += [self.tokenizer.eos_token_id, self.tokenizer.convert_tokens_to_ids("<|end|>")]
            stop = [t for t in stop if t is not None and t != self.tokenizer.unk_token_id]
        overrides.setdefault("stop_token_ids", tuple(dict.fromkeys(t for t in stop if t is not None)))
        return GenerationConfig(**overrides)

    def encode(self, prompts: Sequence[str] | Sequence[Sequence[int]]) -> list[list[int]]:
        if not prompts:
            raise GenerationError("prompts: expected at least one prompt")
        out = []
        for p in prompts:
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise GenerationError("prompts: text prompts need a tokenizer")
                p = self.tokenizer.encode(p, add_special_tokens=False)
            if len(p) == 0:
                bos = self.model.config.bos_token_id
                if bos is None:
                    raise GenerationError("prompts: an empty prompt needs a BOS token")
                p = [bos]
            out.append([int(t) for t in p])
        vocab = self.model.config.vocab_size
        bad = [t for p in out for t in p if not 0 <= t < vocab]
        if bad:
            raise GenerationError(f"prompts: token id {bad[0]} outside the vocabulary (size {vocab})")
        return out

    # ------------------------------------------------------------------ public entry points
    @torch.inference_mode()
    def generate(
        self,
        prompts: Sequence[str] | Sequence[Sequence[int]],
        config: GenerationConfig | None = None,
        cancel: threading.Event | None = None,
        batch_size: int | None = None,
    ) -> list[Completion]:
        """Completions for every prompt: num_return_sequences each, prompt by prompt.
        batch_size: prompts decoded together; by default as many as give 16 rows on a CPU (the most
        the one-call decode step takes), `GPU_ROWS` elsewhere. Batches group prompts of similar
        length, so that little of a batch is padding; the order of the results stays the prompts'.
        With prompt_lookup, one prompt at a time."""
        config = config or self.default_config()
        ids = self.encode(prompts)
        if batch_size is not None and batch_size < 1:
            raise GenerationError(f"batch_size: expected at least 1, got {batch_size}")
        size = batch_size or self.default_batch_size(config, len(ids))
        if config.prompt_lookup:  # drafts are per row
            size = 1
        if size >= len(ids):
            return self._generate_batch(ids, config, cancel)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out: list[Completion] = []
        for k, start in enumerate(range(0, len(ids), size)):
            chunk = order[start : start + size]
            if cancel is not None and cancel.is_set():  # the rest ends at once, without a prefill
                empty = "" if self.tokenizer is not None else None
                out += [Completion([], empty, "cancelled", i, None, len(ids[i]))
                        for i in chunk for _ in range(config.num_return_sequences)]  # fmt: skip
                continue
            # each batch its own seed: equal prompts in two batches do not draw the same samples
            seeded = config if config.seed is None else replace(config, seed=config.seed + k)
            for c in self._generate_batch([ids[i] for i in chunk], seeded, cancel):
                c.prompt_index = chunk[c.prompt_index]
                out.append(c)
        return sorted(out, key=lambda c: c.prompt_index)  # stable: each prompt's own order stays

    def default_batch_size(self, config: GenerationConfig, prompts: int) -> int:
        rows = MAX_ROWS if self.device.type == "cpu" else GPU_ROWS
        return max(1, rows // max(config.num_beams, config.num_return_sequences))

    def _generate_batch(
        self, ids: list[list[int]], config: GenerationConfig, cancel: threading.Event | None
    ) -> list[Completion]:
        if config.strategy == "beam":
            return self.beam_search(ids, config, cancel)
        n = config.num_return_sequences
        collector = _Collector(len(ids) * n, config, self.tokenizer)
        steps = self._steps(ids, config)
        for step_tokens in steps:
            if cancel is not None and cancel.is_set():
                collector.finish("cancelled")
                break
            if collector.add(step_tokens):
                break
        steps.close()
        collector.finish("length")
        completions = [collector.completion(i) for i in range(len(ids) * n)]
        for i, c in enumerate(completions):
            c.prompt_index, c.prompt_tokens = i // n, len(ids[i // n])
        return completions

    @torch.inference_mode()
    def stream(
        self,
        prompt: str | Sequence[int],
        config: GenerationConfig | None = None,
        cancel: threading.Event | None = None,
    ) -> Iterator[str]:
        """Text deltas of one completion; joined they equal `generate(...)[0].text`. Never splits a
        multi-byte character (a partial UTF-8 sequence decodes to U+FFFD and is held back) and holds
        back text that may be the start of a stop string."""
        if self.tokenizer is None:
            raise GenerationError("stream: needs a tokenizer")
        config = config or self.default_config()
        if config.strategy == "beam" or config.num_return_sequences > 1:
            raise GenerationError("stream: one sequence only (no beam search, num_return_sequences 1)")
        ids = self.encode([prompt])
        collector = _Collector(1, config, self.tokenizer)
        decoded = _IncrementalText(self.tokenizer)
        sent = 0
        steps = self._steps(ids, config, short_chunks=True)
        try:
            for step_tokens in steps:
                if cancel is not None and cancel.is_set():
                    collector.finish("cancelled")
                    break
                done = collector.add(step_tokens)
                if done:
                    break
                text = decoded.text(collector.rows[0].tokens)
                ready = len(text) - _held_back(text, config.stop_strings)
                if ready > sent:
                    yield text[sent:ready]
                    sent = ready
        finally:
            steps.close()
        collector.finish("length")
        self.last_completion = collector.completion(0)
        self.last_completion.prompt_tokens = len(ids[0])
        if len(self.last_completion.text) > sent:
            yield self.last_completion.text[sent:]

    # ------------------------------------------------------------------ step generators
    def _prefill(self, ids: list[list[int]], config: GenerationConfig, hidden: bool = False):
        tokens, mask = left_pad(ids, self.pad_id, self.device)
        # Room for the usual reply up front; a longer one grows the KV buffers by doubling. Sizing
        # them by max_new_tokens alone made a generous limit (or one beam search step, which copies
        # the buffers) cost memory and time for slots that a stop token leaves unused.
        room = min(config.max_new_tokens, KV_ROOM)
        cache = self.model.allocate_cache(
            len(ids), capacity=tokens.shape[1] + room, kv_dtype=self.kv_cache_dtype
        )
        keep = 0 if hidden else 1
        out = self.model(tokens, attention_mask=mask, cache=cache, num_logits_to_keep=keep,
                         output_hidden_states=hidden)  # fmt: skip
        return out.logits[:, -1].float(), cache, out.hidden_states, tokens, mask

    def _steps(
        self, ids: list[list[int]], config: GenerationConfig, short_chunks: bool = False
    ) -> Iterator[Tensor]:
        with _evaluating(self.model):
            if config.strategy == "contrastive":
                yield from self._contrastive_steps(ids, config)
            else:
                yield from self._sample_steps(ids, config, short_chunks)

    def _sample_steps(
        self, ids: list[list[int]], config: GenerationConfig, short_chunks: bool = False
    ) -> Iterator[Tensor]:
        """Prefill once, then yield (rows,) next tokens; the consumer stops the iteration."""
        logits, cache, _, tokens, mask = self._prefill(ids, config)
        n = config.num_return_sequences
        if n > 1:
            cache.expand_rows(n)
            logits, tokens, mask = (t.repeat_interleave(n, 0) for t in (logits, tokens, mask))
        generator = None
        if config.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(config.seed)
        pick = _Pick(config, generator, self._repetition_penalty(config, tokens, mask, logits.shape[-1]))
        if config.prompt_lookup:
            plain_greedy = config.temperature == 0 and pick.penalty is None
            yield from lookup_steps(self.model, logits, cache, ids[0], config.prompt_lookup, config.max_new_tokens,
                                    self.ngrams, None if plain_greedy else pick)  # fmt: skip
            return
        if config.temperature == 0 and pick.penalty is None:
            yield from self._greedy_steps(logits, cache, config, short_chunks)
            return
        step_input = torch.empty(logits.shape[0], 1, dtype=torch.long, device=self.device)
        for step in range(config.max_new_tokens):
            nxt = pick(logits)
            yield nxt
            if step + 1 == config.max_new_tokens:
                return
            step_input[:, 0] = nxt
            logits = self.model(step_input, cache=cache).logits[:, -1].float()

    def _greedy_steps(
        self, logits: Tensor, cache: HybridCache, config: GenerationConfig, short_chunks: bool = False
    ) -> Iterator[Tensor]:
        """Plain greedy decoding after the prefill's `logits`: chunks of steps in one call of the C
        kernels where they cover the model (`HybridLM.decode_greedy`; the same tokens without the
        Python around each step), else one `forward` per step."""
        stops = config.stop_ids
        stop_tensor = torch.tensor(stops, dtype=torch.long, device=self.device)
        chunk = GREEDY_CHUNK_SHORT if short_chunks or config.stop_strings else GREEDY_CHUNK
        finished = torch.zeros(logits.shape[0], dtype=torch.bool, device=self.device)
        step_input = torch.empty(logits.shape[0], 1, dtype=torch.long, device=self.device)
        nxt, left, in_c = logits.argmax(-1), config.max_new_tokens, True
        while True:
            yield nxt
            left -= 1
            if left == 0:
                return
            finished |= torch.isin(nxt, stop_tensor)
            steps = self.model.decode_greedy(nxt, cache, min(chunk, left), stops, finished) if in_c else None
            if steps is None:  # not covered (nor, then, for the rest of this generation)
                in_c = False
                step_input[:, 0] = nxt
                nxt = self.model(step_input, cache=cache).logits[:, -1].argmax(-1)
                continue
            yield from steps[:-1]
            left -= steps.shape[0] - 1
            nxt = steps[-1]

    def _contrastive_steps(self, ids: list[list[int]], config: GenerationConfig) -> Iterator[Tensor]:
        logits, cache, hidden, tokens, mask = self._prefill(ids, config, hidden=True)
        penalty = self._repetition_penalty(config, tokens, mask, logits.shape[-1])
        return contrastive_steps(self.model, logits, cache, hidden, mask, config.top_k, config.penalty_alpha,
                                 config.max_new_tokens, penalty)  # fmt: skip

    @staticmethod
    def _repetition_penalty(
        config: GenerationConfig, tokens: Tensor, mask: Tensor, vocab: int
    ) -> RepetitionPenalty | None:
        if config.repetition_penalty == 1.0:
            return None
        return RepetitionPenalty(tokens, mask, vocab, config.repetition_penalty)

    def beam_search(
        self, ids: list[list[int]], config: GenerationConfig, cancel: threading.Event | None = None
    ) -> list[Completion]:
        """Per prompt, its num_return_sequences best beam hypotheses, best first."""
        stops = _Stops(config, self.tokenizer)
        with _evaluating(self.model):
            logits, cache, _, tokens, mask = self._prefill(ids, config)
            penalty = self._repetition_penalty(config, tokens, mask, logits.shape[-1])
            hits = stops.hits_string if stops.strings else None
            finished = beam_search(self.model, logits, cache, config.num_beams, config.max_new_tokens, stops.ids,
                                   config.length_penalty, config.early_stopping, self.pad_id, cancel, penalty,
                                   hits)  # fmt: skip
        cut_short = "cancelled" if cancel is not None and cancel.is_set() else "length"
        out = []
        for b, hyps in enumerate(finished):
            for score, seq in sorted(hyps, key=lambda h: -h[0])[: config.num_return_sequences]:
                shown, text, cut = stops.cut(seq)
                reason = "stop" if cut or (seq and seq[-1] in stops.ids) else cut_short
                out.append(Completion(shown, text, reason, b, score, len(ids[b])))
        return out


@contextmanager
def sigint_cancels(second_interrupts: bool = True) -> Iterator[threading.Event]:
    """Within: Ctrl-C sets the returned event, so generation stops at its next step and keeps what
    it has, instead of an exception tearing through a forward pass; with `second_interrupts`, a
    second Ctrl-C raises KeyboardInterrupt as usual. Main thread only (Python's signal rule)."""
    cancel = threading.Event()

    def on_sigint(signum, frame) -> None:
        if second_interrupts and cancel.is_set():
            raise KeyboardInterrupt
        cancel.set()

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield cancel
    finally:
        signal.signal(signal.SIGINT, previous)


@contextmanager
def _evaluating(model: HybridLM) -> Iterator[None]:
    """Eval mode for the duration (no gradient checkpointing, no adapter dropout), then the model's
    own mode again: an engine made in the middle of training leaves it training."""
    if not model.training:  # the usual case; switching walks every module (~0.5 ms)
        yield
        return
    model.eval()
    try:
        yield
    finally:
        model.train()


class _IncrementalText:
    """The text of a growing list of tokens at O(new tokens) per call, not O(all tokens): the text
    up to a settled token (one that ends a whole character) is kept, and each call decodes only
    from a few tokens before it, so that a tokenizer's context-dependent spacing comes out as in a
    full decode. Falls back to a full decode wherever the window disagrees with the settled text."""

    CONTEXT = 4  # tokens decoded again before the settled point

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.settled_tokens = 0
        self.settled_text = ""

    def text(self, tokens: list[int]) -> str:
        start = max(0, self.settled_tokens - self.CONTEXT)
        before = self._decode(tokens[start : self.settled_tokens])
        window = self._decode(tokens[start:])
        consistent = window.startswith(before)
        text = self.settled_text + window[len(before) :] if consistent else self._decode(tokens)
        if not text.endswith("\ufffd"):  # a whole character: settle here
            self.settled_tokens, self.settled_text = len(tokens), text
        return text

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)


def _held_back(text: str, stop_strings: tuple[str, ...]) -> int:
    """How many trailing characters to hold back: a partial UTF-8 character (U+FFFD), and before it
    a possible stop-string start (the partial character may be the stop string's next one)."""
    whole = text.rstrip("\ufffd")
    hold = 0
    for s in stop_strings:
        for k in range(min(len(s) - 1, len(whole)), 0, -1):
            if whole.endswith(s[:k]):
                hold = max(hold, k)
                break
    return len(text) - len(whole) + hold


def generate(
    model: HybridLM, prompts: list[list[int]], config: GenerationConfig, pad_id: int = 0, tokenizer=None
) -> list[list[int]]:
    """New tokens for each prompt (without the prompt); a stop token that ended a row is kept."""
    engine = Engine(model, tokenizer)
    engine.pad_id = pad_id
    return [c.tokens for c in engine.generate(prompts, config)]


def config_from(base: GenerationConfig, **changes) -> GenerationConfig:
    """A copy of `base` with `changes` (None values ignored), validated again."""
    known = {f.name for f in fields(GenerationConfig)}
    return replace(base, **{k: v for k, v in changes.items() if v is not None and k in known})


KV_CACHE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MODEL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_engine(
    path: str,
    adapter: str | None = None,
    device: str | None = None,
    compile: bool = False,
    kv_cache_dtype: str | None = None,
    dtype: str | None = None,
) -> Engine:
    """An engine for a model directory (its tokenizer included), with a LoRA adapter merged in if given.
    `path` may also be an adapter directory alone: its recorded base is loaded and the adapter merged.
    `dtype` casts the weights after the merge (default: as saved, fp32): bfloat16 or float16 halve
    the bytes a decode step reads. On a CPU a bf16 model's decode step reads its bf16 weights and
    sums in fp32 (`fused_step`); float16 takes the (slower) module path there. The adapter's (else
    the directory's, else the tokenizer's directory's) `lookup_ngrams.safetensors`, if any, is what
    prompt lookup drafts from where the text has no match (read when lookup first needs it)."""
    for flag, value, choices in (("--kv-cache-dtype", kv_cache_dtype, KV_CACHE_DTYPES),
                                 ("--dtype", dtype, MODEL_DTYPES)):  # fmt: skip
        if value and value not in choices:
            raise GenerationError(f"{flag} {value}: expected one of {', '.join(choices)}")
    from .checkpoint import load_model
    from .tokenizer import load_tokenizer

    tokenizer_dir = Path(path)
    if adapter or (tokenizer_dir / "adapter_config.json").exists():
        from .finetune import is_adapter_dir, load_model_with_adapter, recorded_base

        model = load_model_with_adapter(path, adapter)
        if is_adapter_dir(path) and not (tokenizer_dir / "tokenizer_config.json").exists():
            tokenizer_dir = recorded_base(tokenizer_dir)
    else:
        model = load_model(path)
    if device:
        try:
            model = model.to(device)
        except (
            RuntimeError,
            AssertionError,
            ValueError,
        ) as e:  # no such device, torch without CUDA, bad name
            reason = describe(e, with_type=False)
            if reason.startswith("Expected one of"):  # torch lists every device type it knows of
                reason = "expected a device such as cpu, cuda, cuda:1 or mps"
            raise GenerationError(f"--device {device}: not usable here ({reason})") from None
    if dtype:
        model = model.to(MODEL_DTYPES[dtype])
    kv = KV_CACHE_DTYPES[kv_cache_dtype] if kv_cache_dtype else None
    dirs = (Path(adapter),) if adapter else ()  # a fine-tuned model's own predictions first
    tables = [d / NGRAMS_NAME for d in dict.fromkeys((*dirs, Path(path), tokenizer_dir))]
    table = next((t for t in tables if t.exists()), None)
    return Engine(model, load_tokenizer(tokenizer_dir), compile=compile, kv_cache_dtype=kv, ngrams=table)
