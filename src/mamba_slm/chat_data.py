"""Conversations for chat SFT: loading, rendering with the chat template, assistant-only labels.

Design choices:
  * A conversation is a list of `{"role", "content"}` messages (roles system / user /
    assistant), the format of OpenAI and of Hugging Face chat templates. Sources: JSONL or JSON
    with a `messages` list per record, ChatterBot-style YAML (`conversations:` lists of
    alternating user / assistant lines), a folder of those, or the built-in `chatterbot`.
  * Built-in `chatterbot`: the English YAML conversations of the PyPI wheel
    `chatterbot-corpus==1.3.3` (2,026 entries in 21 files, BSD-3-Clause), fetched once with
    `pip download --no-deps`, checked against its sha256 and read as YAML; the package is never
    installed or imported. One entry is malformed upstream (a string, not a list of lines) and is
    skipped, leaving 2,025 conversations.
  * Rendering uses the tokenizer's own chat template, so any HF tokenizer works. Loss targets
    are found by rendering each prefix: the text an assistant turn adds after the generation
    prompt (its content and the end-of-turn marker) is the target; the role marker, system and
    user turns are context (label -100). The text is tokenized once and the targets are mapped
    onto tokens by character offsets, so they match the ids the model trains on exactly.
  * YAML lines are kept as the text written: YAML 1.1 typing (`Yes` -> True, `12:30` -> 750) is
    off, and a line that is not text (an unquoted `Note: x` is a mapping) is an error.
  * Every conversation must contain an assistant turn (otherwise there is nothing to learn and
    the source is probably malformed): a one-line `DataError` names the file and record.
  * Conversations are never packed together: each is one row of a right-padded batch, so no
    recurrent (Mamba) state or attention crosses from one conversation into another.
"""

from __future__ import annotations

import json
import random
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from .data import DataError, _pip_download, cache_dir, check_max_samples, sha256
from .errors import describe

CHATTERBOT = "chatterbot"
CHATTERBOT_VERSION = "1.3.3"
CHATTERBOT_WHEEL = f"chatterbot_corpus-{CHATTERBOT_VERSION}-py2.py3-none-any.whl"
CHATTERBOT_SHA256 = "86de5300afb9a80826386339d3bec79c0a72eb0358abb8327e2ecef5ae0ce154"
ROLES = ("system", "user", "assistant")


class Conversation(list[dict[str, str]]):
    """`{"role", "content"}` messages that remember their record (`where`): a chat template may reject
    a conversation only once a tokenizer renders it, after the split, and the error names the record."""

    def __init__(self, messages=(), where: str = "conversation"):
        super().__init__(messages)
        self.where = where


def fetch_chatterbot(root: Path | None = None) -> list[Path]:
    """The English YAML files of chatterbot-corpus, downloading and checking the wheel on first use."""
    root = root or cache_dir() / f"chatterbot-corpus-{CHATTERBOT_VERSION}"
    english = root / "english"
    if not (english / ".complete").exists():
        root.mkdir(parents=True, exist_ok=True)
        wheel = root / CHATTERBOT_WHEEL
        if not wheel.exists() or sha256(wheel) != CHATTERBOT_SHA256:
            _pip_download(f"chatterbot-corpus=={CHATTERBOT_VERSION}", root, binary=True)
        if not wheel.exists() or sha256(wheel) != CHATTERBOT_SHA256:
            raise DataError(f"{wheel}: missing or sha256 mismatch; delete it and retry")
        with tempfile.TemporaryDirectory(dir=root) as tmp, zipfile.ZipFile(wheel) as zf:
            staged = Path(tmp) / "english"
            staged.mkdir()
            for name in zf.namelist():
                if name.startswith("chatterbot_corpus/data/english/") and name.endswith(".yml"):
                    (staged / Path(name).name).write_bytes(zf.read(name))  # flat: no path from the archive
            (staged / ".complete").touch()
            if english.exists():
                import shutil

                shutil.rmtree(english)
            staged.rename(english)
    return sorted(english.glob("*.yml"))


def load_conversations(source: str, max_samples: int | None = None) -> list[Conversation]:
    """Conversations from `chatterbot`, a .jsonl/.json/.yml/.yaml file, or a folder of them."""
    check_max_samples(max_samples)
    if source == CHATTERBOT:
        files = fetch_chatterbot()
    else:
        path = Path(source).expanduser()
        if path.is_dir():
            files = sorted(
                p for p in path.rglob("*") if p.suffix.lower() in (".jsonl", ".json", ".yml", ".yaml")
            )
        elif path.is_file():
            files = [path]
        else:
            raise DataError(
                f"{source}: no such conversation file or folder (or use the built-in {CHATTERBOT!r})"
            )
        if not files:
            raise DataError(f"{source}: no .jsonl, .json, .yml or .yaml files in it")
    conversations: list[Conversation] = []
    for file in files:
        reader = _read_yaml if file.suffix.lower() in (".yml", ".yaml") else _read_json
        for where, messages in reader(file):
            if source == CHATTERBOT and not (messages and any(m["role"] == "assistant" for m in messages)):
                continue  # upstream's one malformed entry (trivia.yml #13, a string): skipped, not fatal
            conversations.append(check_conversation(messages, where))
    if not conversations:
        raise DataError(f"{source}: no conversations found")
    return conversations[:max_samples] if max_samples is not None else conversations


def _read_json(file: Path):
    """(where, messages) for each record of a JSONL file, or of a JSON list / {"messages"} object."""
    try:
        text = file.read_text(encoding="utf-8")
        if file.suffix.lower() == ".jsonl":
            records = _parse_jsonl(file, text)
        else:
            data = json.loads(text)
            records = list(enumerate(data if isinstance(data, list) else [data], 1))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{file}: not readable JSON ({e})") from None
    for i, record in records:
        where = f"{file}:{i}" if file.suffix.lower() == ".jsonl" else f"{file}[{i - 1}]"
        if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
            raise DataError(f'{where}: expected an object with a "messages" list')
        yield where, record["messages"]


def _parse_jsonl(file: Path, text: str) -> list[tuple[int, Any]]:
    """(line number, record) for each non-blank line; a syntax error names the file's line, since
    json.loads on one line alone reports "line 1"."""
    records = []
    # split("\n"), not splitlines(): a JSON string may hold a raw U+2028, U+2029 or U+0085, which
    # splitlines() breaks on; "\r" of a CRLF line is whitespace to json.loads.
    for i, line in enumerate(text.split("\n"), 1):
        if line.strip():
            try:
                records.append((i, json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(f"{file}:{i}: not readable JSON ({e.msg} at column {e.colno})") from None
    return records


def _read_yaml(file: Path):
    """ChatterBot YAML: `conversations` is a list of line lists; lines alternate user, assistant."""
    import yaml

    try:
        # BaseLoader: every scalar stays the string written; safe_load would turn `Yes` into True and
        # `12:30` into 750, which str() then trains on as "True" and "750".
        data = yaml.load(file.read_text(encoding="utf-8"), Loader=yaml.BaseLoader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise DataError(f"{file}: not readable YAML ({describe(e, with_type=False)})") from None
    if not isinstance(data, dict) or not isinstance(data.get("conversations"), list):
        raise DataError(f"{file}: expected a mapping with a 'conversations' list (ChatterBot format)")
    for i, lines in enumerate(data["conversations"]):
        where = f"{file}: conversation {i}"
        if not isinstance(lines, list):
            yield where, []  # not a list of lines: no assistant turn (an error, except in the built-in)
            continue
        for j, line in enumerate(lines):
            if not isinstance(line, str):  # str() would train on "{'Note': 'x'}" for `- Note: x`
                kind = "mapping" if isinstance(line, dict) else "list"
                raise DataError(f"{where}: line {j} must be text, got a YAML {kind} (quote the line)")
        turns = [{"role": ROLES[1 + j % 2], "content": line} for j, line in enumerate(lines)]
        if len(turns) > 1 and turns[-1]["role"] == "user":
            turns.pop()  # a closing user line has no reply to learn
        yield where, turns


def check_conversation(messages: Any, where: str) -> Conversation:
    """The messages as plain dicts, or a one-line DataError naming `where`."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: a conversation must be a non-empty list of messages")
    out = []
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise DataError(f'{where}: message {j} must be {{"role": one of {list(ROLES)}, "content": str}}')
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: the conversation has no assistant turn, so there is nothing to learn")
    return Conversation(out, where)


def split_conversations(
    conversations: list[Conversation], validation_split: float, seed: int = 0
) -> tuple[list[Conversation], list[Conversation]]:
    """(train, held-out). Conversations that open with the same user message stay on one side (the
    ChatterBot corpus repeats many: 2,025 conversations, 748 distinct openings), so no held-out
    question was seen in training: a seeded shuffle of the distinct openings, the last
    `validation_split` fraction of them (at least one, never all) held out with all their conversations."""
    if not 0 < validation_split < 1:
        raise DataError(f"--validation-split: expected a fraction in (0, 1), got {validation_split}")
    groups: dict[str, list[Conversation]] = {}
    for c in conversations:
        opening = next((m["content"] for m in c if m["role"] != "system"), "")
        groups.setdefault(" ".join(opening.lower().split()), []).append(c)
    if len(groups) < 2:
        raise DataError(f"{len(groups)} distinct conversation(s): need at least 2 to hold some out")
    keys = list(groups)
    random.Random(seed).shuffle(keys)
    n_val = min(max(1, round(validation_split * len(keys))), len(keys) - 1)  # keep one to train on
    return [c for k in keys[:-n_val] for c in groups[k]], [c for k in keys[-n_val:] for c in groups[k]]


def render_chat(
    tokenizer, messages: Conversation, max_length: int | None = None, where: str = ""
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one conversation: labels equal input_ids on assistant targets, else -100.
    `where` names the conversation in errors (default: its record, for one from load_conversations)."""
    where = where or getattr(messages, "where", "conversation")
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError("tokenizer: it has no chat template; train one with `mamba-slm tokenizer train`")
    if not getattr(tokenizer, "is_fast", False):
        raise DataError("tokenizer: chat SFT needs a fast tokenizer (character offsets for the targets)")
    render = lambda msgs, prompt: _render(tokenizer, msgs, prompt, where)
    text = render(messages, False)
    spans = []  # [start, end) character ranges of the assistant targets
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before, after = render(messages[:k], True), render(messages[: k + 1], False)
        if not (text.startswith(after) and after.startswith(before)):
            raise DataError(
                "tokenizer: its chat template does not render conversations turn by turn (prefix)"
            )
        spans.append((len(before), len(after)))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    starts = [start for start, _ in enc["offset_mapping"]]
    labels = [t if any(a <= s < b for a, b in spans) else -100 for t, s in zip(ids, starts, strict=True)]
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    return ids, labels


def _render(tokenizer, messages: list, prompt: bool, where: str) -> str:
    """The chat template's text. A template may raise (Llama-2 / Mistral ones reject a system turn
    or non-alternating roles): a one-line DataError naming the conversation, not a jinja2 traceback."""
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
    except TemplateError as e:
        raise DataError(
            f"{where}: the tokenizer's chat template rejects it ({describe(e, with_type=False)})"
        ) from None


def tokenize_conversations(
    conversations: list[Conversation], tokenizer, max_length: int | None = None
) -> list[tuple[list[int], list[int]]]:
    """Rendered (input_ids, labels) pairs; a conversation cut by max_length to no target is dropped."""
    # A target at position 0 has no prediction (labels are shifted), hence "any target after the first".
    pairs = [
        render_chat(tokenizer, c, max_length, getattr(c, "where", f"conversation {i}"))
        for i, c in enumerate(conversations)
    ]
    return [(ids, lab) for ids, lab in pairs if any(x != -100 for x in lab[1:])]
