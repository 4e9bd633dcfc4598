"""`mamba-slm demo` (`make demo`): the main workflow end to end on the built-in corpus, on CPU.

fetch Shakespeare -> train a BPE tokenizer -> pre-train the `small` hybrid -> perplexity on
held-out Milton against a unigram baseline -> sample a few continuations -> LoRA chat SFT on the
built-in ChatterBot conversations (held-out assistant loss before/after, replies to held-out
questions) -> runs/demo/report.md.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ModelConfig
from .data import DataError, DataSpec, load_corpus, tokenize_and_pack
from .evaluate import perplexity, unigram_perplexity
from .generation import SamplingConfig, generate
from .model.hybrid import HybridLM
from .speculative import NGRAMS_NAME, predicted_ngrams
from .tokenizer import train_tokenizer
from .train import TrainArgs, Trainer

TRANSCRIPT_KINDS = (
    lambda q: q.lower().startswith("my "),  # a help request ("My printer is not printing.")
    lambda q: q.endswith("?") and " you" in f" {q.lower()}",  # a question to the bot
    lambda q: q.endswith("?"),  # any other question (often trivia)
)
PROMPTS = ["ROMEO:\n", "KING HENRY:\nNow, my lords,", "To be, or not to be,", "First Citizen:\nWe are"]


@dataclass
class DemoArgs:
    output_dir: str = "runs/demo"
    dataset: str = "shakespeare"
    vocab_size: int = 4096
    preset: str = "small"
    block_size: int = 256
    batch_size: int = 16
    max_steps: int = 260
    learning_rate: float = 2e-3
    eval_blocks: int = 200
    seed: int = 0
    # Chat SFT, measured on the held-out conversations (2 cores, this model): LoRA r=16 alone lowers the
    # assistant loss by 29-32% whatever the rate and length tried; training the token embeddings too (the
    # chat tokens and modern words were never or rarely seen in Shakespeare) by 38%, as full fine-tuning.
    chat_steps: int = 200  # 0 skips the fine-tuning step
    chat_dataset: str = "chatterbot"
    chat_learning_rate: float = 2e-3
    chat_lora_r: int = 16
    chat_lora_dropout: float = 0.1
    chat_train_embeddings: bool = True
    chat_max_length: int = 128


def run_demo(args: DemoArgs) -> dict:
    start = time.perf_counter()
    out = Path(args.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"{out}: cannot create the output directory ({e.strerror})") from None
    step = lambda n, text: print(f"[{n}/6] {text}", flush=True)  # noqa: E731

    step(1, f"loading {args.dataset}")
    corpus = load_corpus(DataSpec(dataset=args.dataset, seed=args.seed))
    train_chars = sum(len(t) for t in corpus["train"]["text"])

    step(2, f"training a {args.vocab_size}-token BPE tokenizer")
    tokenizer = train_tokenizer(corpus["train"]["text"], args.vocab_size, out / "tokenizer")
    train_blocks = tokenize_and_pack(corpus["train"], tokenizer, args.block_size)["input_ids"]
    val_blocks = tokenize_and_pack(corpus["validation"], tokenizer, args.block_size)["input_ids"]
    eval_blocks = val_blocks[: args.eval_blocks]

    step(3, f"pre-training the '{args.preset}' hybrid for {args.max_steps} steps")
    torch.manual_seed(args.seed)
    config = ModelConfig.from_preset(
        args.preset, vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    model = HybridLM(config)
    train_args = TrainArgs(
        output_dir=str(out / "model"), max_steps=args.max_steps, batch_size=args.batch_size,
        learning_rate=args.learning_rate, warmup_steps=max(1, args.max_steps // 10), eval_steps=0,
        save_steps=0, logging_steps=max(1, args.max_steps // 20), seed=args.seed,
    )  # fmt: skip
    train_start = time.perf_counter()
    result = Trainer(model, train_blocks, [], train_args, tokenizer.pad_token_id, tokenizer).train()
    train_seconds = time.perf_counter() - train_start
    losses = [e for e in result["log"] if "loss" in e]
    # What `--prompt-lookup` drafts from where the text has no earlier match, as `train` writes it.
    predicted_ngrams(model, train_blocks).save(out / "model" / NGRAMS_NAME)

    step(4, f"evaluating on {len(eval_blocks)} held-out blocks")
    model_ppl = perplexity(model, eval_blocks)
    unigram_ppl = unigram_perplexity(train_blocks, eval_blocks, len(tokenizer))

    step(5, "sampling")
    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    samples = generate(
        model, prompts, SamplingConfig(max_new_tokens=60, temperature=0.8, top_p=0.95, seed=args.seed),
        pad_id=tokenizer.pad_token_id,
    )  # fmt: skip
    # EOS separates paragraphs in the packed training text: show it as a blank line
    eos = tokenizer.eos_token_id
    texts = [
        p + "\n\n".join(tokenizer.decode(part) for part in _split(s, eos))
        for p, s in zip(PROMPTS, samples, strict=True)
    ]

    chat = None
    if args.chat_steps:
        step(6, f"LoRA chat fine-tuning on the built-in conversations for {args.chat_steps} steps")
        chat = chat_finetune(args, out)

    summary = {
        "chat": chat,
        "train_characters": train_chars,
        "train_tokens": sum(len(b) - 1 for b in train_blocks),
        "parameters": model.num_parameters(),
        "layer_pattern": config.layer_pattern,
        "steps": result["step"],
        "tokens_seen": result["step"] * args.batch_size * args.block_size,
        "train_seconds": train_seconds,
        "first_loss": losses[0]["loss"] if losses else None,
        "last_loss": losses[-1]["loss"] if losses else None,
        "tokens_per_s": sum(e["tokens_per_s"] for e in losses) / max(len(losses), 1),
        "val_perplexity": model_ppl,
        "unigram_perplexity": unigram_ppl,
        "samples": texts,
        "wall_seconds": time.perf_counter() - start,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": torch.get_num_threads(),
    }
    (out / "report.md").write_text(report(summary, args))
    print_summary(summary, out)
    return summary


def report(s: dict, args: DemoArgs) -> str:
    lines = [
        "# mamba-slm demo",
        "",
        f"Corpus: {args.dataset} ({s['train_characters']:,} training characters, {s['train_tokens']:,} tokens); "
        "validation: Milton (held out).",
        f"Model: `{args.preset}` preset, layers `{s['layer_pattern']}`, {s['parameters']:,} parameters, "
        f"{args.vocab_size}-token BPE.",
        f"Training: {s['steps']} steps x {args.batch_size} x {args.block_size} tokens = {s['tokens_seen']:,} tokens "
        f"in {s['train_seconds']:.0f} s ({s['tokens_per_s']:.0f} tokens/s, {s['threads']} threads); "
        f"loss {s['first_loss']:.3f} -> {s['last_loss']:.3f}.",
        "",
        "| held-out perplexity (Milton) | value |",
        "|---|---|",
        f"| unigram model fitted on the training text | {s['unigram_perplexity']:.1f} |",
        f"| this model | {s['val_perplexity']:.1f} |",
        f"| ratio | {s['val_perplexity'] / s['unigram_perplexity']:.2f} |",
        "",
        "## Samples (temperature 0.8, top-p 0.95)",
        "",
    ]
    for text in s["samples"]:
        lines += ["```", text.strip(), "```", ""]
    if s["chat"]:
        lines += chat_report(s["chat"], args)
    lines.append(f"Wall time {s['wall_seconds']:.0f} s, peak memory {s['peak_rss_mb']:.0f} MB.")
    return "\n".join(lines) + "\n"


def print_summary(s: dict, out: Path) -> None:
    print("=" * 60)
    print(f"Trained {s['parameters']:,} parameters for {s['steps']} steps in {s['train_seconds']:.0f} s")
    print(f"Loss {s['first_loss']:.3f} -> {s['last_loss']:.3f}")
    print(f"Held-out perplexity {s['val_perplexity']:.1f} (unigram baseline {s['unigram_perplexity']:.1f})")
    print("-" * 60)
    print(s["samples"][0].strip())
    if s["chat"]:
        c = s["chat"]
        print("-" * 60)
        print(f"Chat LoRA ({100 * c['trainable_fraction']:.2f}% trainable): held-out assistant loss "
              f"{c['val_loss_before']:.3f} -> {c['val_loss_after']:.3f} in {c['train_seconds']:.0f} s")  # fmt: skip
        for q, reply, _ in c["transcript"][:1]:
            print(f"User: {q}\nAssistant: {reply}")
    print("=" * 60)
    print(f"Report: {out / 'report.md'}  (wall {s['wall_seconds']:.0f} s, peak {s['peak_rss_mb']:.0f} MB)")


def chat_finetune(args: DemoArgs, out: Path) -> dict:
    """LoRA chat SFT of the pre-trained model (out/model) on ChatterBot, then replies to held-out questions."""
    from .chat_data import load_conversations, split_conversations
    from .finetune import FinetuneArgs, load_model_with_adapter, run_finetune
    from .tokenizer import load_tokenizer

    steps = args.chat_steps
    train = TrainArgs(
        output_dir=str(out / "chat-lora"), max_steps=steps, batch_size=args.batch_size,
        learning_rate=args.chat_learning_rate, warmup_steps=max(1, steps // 10), weight_decay=0.0, eval_steps=0,
        save_steps=0, logging_steps=max(1, steps // 10), seed=args.seed,
    )  # fmt: skip
    result = run_finetune(FinetuneArgs(
        base=str(out / "model"), train=train, chat=True, dataset=args.chat_dataset, use_lora=True, lora_r=args.chat_lora_r,
        lora_alpha=2 * args.chat_lora_r, lora_dropout=args.chat_lora_dropout, max_length=args.chat_max_length,
        validation_split=0.1, train_embeddings=args.chat_train_embeddings,
    ), on_saved=lambda model_dir, tuned, conversations: predicted_ngrams(tuned, conversations).save(
        model_dir / NGRAMS_NAME))  # the chat model's own table, as `finetune` writes it  # fmt: skip
    tokenizer = load_tokenizer(out / "chat-lora")
    model = load_model_with_adapter(out / "model", out / "chat-lora").eval()
    # The questions come from the split run_finetune held out (same seed): never trained on. One of each
    # kind, the first in held-out order: a help request, a question to the bot, any other question.
    _, held_out = split_conversations(load_conversations(args.chat_dataset), 0.1, args.seed)
    picked: list[tuple[str, str]] = []
    for kind in TRANSCRIPT_KINDS:
        for conv in held_out:
            question, answer = conv[0]["content"].strip(), conv[1]["content"].strip()
            if kind(question) and "\n" not in answer and question not in [q for q, _ in picked]:
                picked.append((question, answer))
                break
    result["transcript"] = []
    if not picked:
        return result
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                             return_dict=False) for q, _ in picked]  # fmt: skip
    config = SamplingConfig(
        max_new_tokens=48, temperature=0.0, eos_token_id=end
    )  # greedy: the model's best guess
    replies = generate(model, prompts, config, pad_id=tokenizer.pad_token_id)
    texts = [tokenizer.decode([t for t in r if t != end], skip_special_tokens=True).strip() for r in replies]
    result["transcript"] = [(q, text, a) for (q, a), text in zip(picked, texts, strict=True)]
    return result


def chat_report(c: dict, args: DemoArgs) -> list[str]:
    drop = 100 * (1 - c["val_loss_after"] / c["val_loss_before"])
    lines = [
        "## Chat fine-tuning (LoRA)",
        "",
        f"LoRA r={args.chat_lora_r} on every Mamba, attention and MLP projection"
        f"{', plus the token embeddings (tied to the LM head)' if args.chat_train_embeddings else ''}: "
        f"{c['trainable_parameters']:,} of "
        f"{c['total_parameters']:,} parameters trainable ({100 * c['trainable_fraction']:.2f}%). "
        f"{c['train_examples']:,} training conversations, {c['step']} steps x {args.batch_size} in "
        f"{c['train_seconds']:.0f} s; loss on assistant tokens only.",
        "",
        "| held-out assistant-token loss (10% of distinct questions) | value |",
        "|---|---|",
        f"| before (pre-trained on Shakespeare only) | {c['val_loss_before']:.3f} |",
        f"| after LoRA chat SFT | {c['val_loss_after']:.3f} |",
        f"| reduction | {drop:.0f}% |",
        "",
        "Greedy replies to held-out openings, the first of each kind: a help request, a question to the bot, "
        "another question (the corpus answer in brackets). A 5M-parameter model pre-trained on Shakespeare for "
        "a few minutes learns the corpus's frequent kinds of reply (troubleshooting, first-person small talk); "
        "trivia is beyond it.",
        "",
    ]
    for question, reply, answer in c["transcript"]:
        lines += [f"> **User:** {question}  ", f"> **Assistant:** {reply}  ", f"> *[corpus: {answer}]*", ""]
    return lines


def _split(tokens: list[int], sep: int) -> list[list[int]]:
    parts: list[list[int]] = [[]]
    for t in tokens:
        if t == sep:
            parts.append([])
        else:
            parts[-1].append(t)
    return parts
