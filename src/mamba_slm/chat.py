"""Terminal chat: a multi-turn session over the generation engine, streamed to the terminal.

`ChatSession` keeps the conversation and renders it for the model: with the tokenizer's chat
template for a chat-tuned model, or as plain text for a pre-trained one (the model continues the
text). The oldest exchanges are dropped when the rendered conversation and the reply would not
fit the context (`max_position_embeddings`); the system prompt always stays. `run_chat` is the
terminal loop: `/reset`, `/system TEXT`, `/history`, `/exit`; Ctrl-C during a reply stops that
reply (a SIGINT handler sets the engine's cancel event, so no exception tears through a forward
pass) and the partial reply stays in the history; Ctrl-C at the prompt does not quit.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from .generation import Engine, GenerationConfig, sigint_cancels

HELP = "commands: /reset (forget the conversation), /system TEXT, /history, /exit; Ctrl-C stops a reply"


def is_chat_model(path: str | Path) -> bool:
    """True when the model (or adapter) directory was chat-tuned (`training_args.json` says so)."""
    args = Path(path) / "training_args.json"
    try:
        return bool(json.loads(args.read_text()).get("chat", False))
    except (OSError, ValueError, AttributeError):
        return False


@dataclass
class ChatSession:
    engine: Engine
    config: GenerationConfig
    system: str | None = None
    template: str = "chat"  # "chat": the tokenizer's chat template; "plain": text continuation
    context_limit: int = 2048
    history: list[dict[str, str]] = field(default_factory=list)

    def reset(self) -> None:
        self.history = []

    def render(self, history: list[dict[str, str]]) -> list[int]:
        tok = self.engine.tokenizer
        if self.template == "chat":
            system = [{"role": "system", "content": self.system}] if self.system else []
            text = tok.apply_chat_template(system + history, add_generation_prompt=True, tokenize=False)
        else:
            parts = ([self.system] if self.system else []) + [m["content"] for m in history]
            text = "\n".join(parts)
        return tok.encode(text, add_special_tokens=False)

    def prompt_ids(self) -> list[int]:
        """The rendered conversation, oldest exchanges dropped until it and the reply fit the context.
        The reply reserves at most half of the context, so a large max_new_tokens does not leave the
        conversation a token or two."""
        budget = self.context_limit - min(self.config.max_new_tokens, self.context_limit // 2)
        ids = self.render(self.history)
        while len(ids) > budget and len(self.history) > 1:
            self.history = self.history[2:] if len(self.history) > 2 else self.history[-1:]
            ids = self.render(self.history)
        # The newest message alone is too long: keep its end, and the system prompt and the
        # template's role markers with it (cutting the rendered ids would drop those first).
        while len(ids) > budget and self.history and self.history[-1]["content"]:
            if not self._drop_oldest_tokens_of_last_message(len(ids) - budget):
                break
            ids = self.render(self.history)
        return ids[-budget:]  # cuts only when the system prompt alone does not fit

    def _drop_oldest_tokens_of_last_message(self, count: int) -> bool:
        """False when the text did not get shorter (nothing more to drop)."""
        tok, last = self.engine.tokenizer, self.history[-1]
        before = last["content"]
        content = tok.encode(before, add_special_tokens=False)
        last["content"] = tok.decode(content[count:]).lstrip("\ufffd").lstrip()  # no half characters
        return len(last["content"]) < len(before)

    def reply(self, user_text: str, cancel: threading.Event | None = None) -> Iterator[str]:
        """Stream the reply to `user_text`; the (possibly partial) reply joins the history."""
        self.history.append({"role": "user", "content": user_text})
        parts: list[str] = []
        try:
            for delta in self.engine.stream(self.prompt_ids(), self.config, cancel):
                parts.append(delta)
                yield delta
        finally:
            self.history.append({"role": "assistant", "content": "".join(parts).strip()})


def run_chat(session: ChatSession, read: Callable[[str], str] = input, out: TextIO = sys.stdout) -> None:
    # An interactive chat relies on Ctrl-C even when started from a shell that ignores SIGINT
    # (background jobs of non-interactive shells do), which Python would otherwise inherit.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    out.write(f"mamba-slm chat ({session.template} mode). {HELP}\n")
    out.flush()
    while True:
        try:
            line = read("you> ").strip()
        except EOFError:
            out.write("\n")
            return
        except KeyboardInterrupt:
            out.write("\n(type /exit to quit)\n")
            continue
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            session.reset()
            out.write("(conversation cleared)\n")
            continue
        if line.startswith("/system"):
            session.system = line[len("/system") :].strip() or None
            out.write(f"(system prompt {'set' if session.system else 'cleared'})\n")
            continue
        if line == "/history":
            for m in session.history:
                out.write(f"[{m['role']}] {m['content']}\n")
            out.write(f"({len(session.history)} messages)\n")
            continue
        if line.startswith("/"):
            out.write(f"unknown command {line.split()[0]}; {HELP}\n")
            continue
        stream_reply(session, line, out)


def stream_reply(session: ChatSession, line: str, out: TextIO) -> None:
    with sigint_cancels(second_interrupts=False) as cancel:  # a chat never quits on Ctrl-C
        out.write("bot> ")
        out.flush()
        for delta in session.reply(line, cancel):
            out.write(delta)
            out.flush()
    out.write(" [stopped]\n" if cancel.is_set() else "\n")
    out.flush()
