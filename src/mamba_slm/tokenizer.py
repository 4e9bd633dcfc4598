"""Tokenizers: train a byte-level BPE on a corpus, or load any Hugging Face tokenizer.

Training uses the `tokenizers` library (Rust, parallel) and saves standard Hugging Face files
(`tokenizer.json`, `tokenizer_config.json` with a chat template), so `AutoTokenizer` loads the
result and so does everything downstream. Loading accepts a trained directory, a hub id, or a
folder with GPT-2 style `encoder.json` + `vocab.bpe` files.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from .errors import describe

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
CHAT_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
SPECIAL_TOKENS = [PAD, BOS, EOS, *CHAT_TOKENS]

# Roles as special tokens; each turn ends with <|end|>; generation continues after <|assistant|>.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


class TokenizerError(ValueError):
    """A tokenizer that cannot be trained or loaded; the message says which and why."""


def train_tokenizer(texts: Iterable[str], vocab_size: int, output_dir: str | Path | None = None):
    """Train a byte-level BPE; returns a `PreTrainedTokenizerFast` (saved to output_dir if given)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise TokenizerError(
            f"--vocab-size: {vocab_size} is too small; byte-level BPE needs at least {256 + len(SPECIAL_TOKENS)}"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=True,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=CHAT_TOKENS,
    )
    fast.chat_template = CHAT_TEMPLATE
    if output_dir is not None:
        save_tokenizer(fast, output_dir)
    return fast


def save_tokenizer(tokenizer, output_dir: str | Path) -> None:
    """The tokenizer's files, written in a temporary directory beside them and each renamed into
    place once complete, so a crash never leaves a half-written tokenizer.json."""
    output_dir = Path(output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".tokenizer-", dir=output_dir) as tmp:
            tokenizer.save_pretrained(tmp)
            for written in sorted(Path(tmp).iterdir()):
                os.replace(written, output_dir / written.name)
    except OSError as e:
        raise TokenizerError(f"{output_dir}: cannot write the tokenizer ({e.strerror})") from None


# A folder AutoTokenizer can load from holds a file of one of these kinds (tokenizer.json,
# tokenizer_config.json, vocab.txt, spiece.model, ...).
TOKENIZER_SUFFIXES = (".json", ".model", ".txt")


def load_tokenizer(name_or_path: str | Path):
    """A trained directory, a hub id, or a folder with GPT-2's encoder.json + vocab.bpe."""
    from transformers import AutoTokenizer

    path = Path(name_or_path).expanduser()
    if path.is_dir() and (path / "encoder.json").exists() and (path / "vocab.bpe").exists():
        tok = _gpt2_style(path)
    else:
        if not path.exists() and str(name_or_path).startswith((".", "/", "~")):
            raise TokenizerError(f"{name_or_path}: no such tokenizer directory")
        if path.is_dir() and not any(f.suffix in TOKENIZER_SUFFIXES for f in path.iterdir()):
            raise TokenizerError(
                f"{name_or_path}: no tokenizer files in it (tokenizer.json, tokenizer_config.json)"
            )
        try:
            tok = AutoTokenizer.from_pretrained(str(name_or_path))
        except Exception as e:  # offline hub, missing files, unknown id
            raise TokenizerError(
                f"{name_or_path}: could not load a tokenizer ({describe(e, with_type=False)})"
            ) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _gpt2_style(path: Path):
    """GPT-2's original files: encoder.json (the vocabulary) and vocab.bpe (the merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    try:
        bpe = models.BPE.from_file(str(path / "encoder.json"), str(path / "vocab.bpe"))
    except Exception as e:  # malformed files
        raise TokenizerError(f"{path}: unreadable encoder.json/vocab.bpe ({e})") from None
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    eos = "<|endoftext|>" if tok.token_to_id("<|endoftext|>") is not None else None
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, bos_token=eos)
