"""`mamba-slm`: a map from subcommands to the modules' functions.

Every command has `--help`; bad input ends with one line on stderr (`mamba-slm: error: ...`)
and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from .checkpoint import CheckpointError
from .config import ConfigError
from .data import DataError, DataSpec, load_corpus, materialize
from .finetune import FinetuneError
from .generation import GenerationError
from .model.hybrid import HybridLM
from .speculative import NGRAMS_NAME, PREDICTED_TOKENS, predicted_ngrams
from .tokenizer import TokenizerError, load_tokenizer, train_tokenizer
from .train import TrainError

USER_ERRORS = (DataError, TokenizerError, ConfigError, CheckpointError, TrainError, FinetuneError,
               GenerationError)  # fmt: skip
MODEL_FIELDS = ("d_model", "n_layers", "layer_pattern", "attn_ratio", "mixer", "d_state", "head_dim", "n_heads",
                "n_kv_heads", "d_intermediate", "chunk_size", "pos_encoding", "sliding_window")  # fmt: skip


class OneLineErrorParser(argparse.ArgumentParser):
    """Usage mistakes (an unknown flag, a bad choice) as one line and exit status 2, like every other
    input error; the usage is one `--help` away. Subcommand parsers inherit the class."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dataset", default="shakespeare", help="built-in name, local file/folder/glob, or hub id"
    )
    p.add_argument("--dataset-config", help="hub dataset configuration, e.g. wikitext-2-raw-v1")
    p.add_argument("--split", default="train", help="hub split to train on")
    p.add_argument("--text-field", default="text", help="the text column of JSON/CSV/Parquet/hub data")
    p.add_argument("--max-samples", type=int, help="keep at most this many training samples")
    p.add_argument(
        "--validation-split",
        type=float,
        default=0.05,
        help="fraction held out when there is no validation split",
    )
    p.add_argument("--streaming", action="store_true", help="stream a hub dataset instead of downloading it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-proc", type=int, help="processes for tokenizing (datasets.map)")


def data_spec(args: argparse.Namespace) -> DataSpec:
    return DataSpec(
        dataset=args.dataset, dataset_config=args.dataset_config, split=args.split, text_field=args.text_field,
        max_samples=args.max_samples, validation_split=args.validation_split, streaming=args.streaming, seed=args.seed,
        num_proc=args.num_proc,
    )  # fmt: skip


def cmd_data_prepare(args: argparse.Namespace) -> None:
    import datasets

    corpus = load_corpus(data_spec(args))  # a hub stream is opened here, not read
    if isinstance(corpus, datasets.IterableDatasetDict) and args.max_samples is None:
        raise DataError("--streaming: data prepare saves the rows it reads; pass --max-samples N")
    corpus = materialize(corpus)  # a stream: only the rows taken are read
    try:
        corpus.save_to_disk(args.output_dir)
    except OSError as e:
        raise DataError(f"{args.output_dir}: cannot write the dataset ({e.strerror})") from None
    for split, ds in corpus.items():
        chars = sum(len(t) for t in ds["text"])
        print(f"{split}: {len(ds):,} samples, {chars:,} characters")
    print(f"saved to {args.output_dir}")


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    corpus = load_corpus(data_spec(args))
    train = corpus["train"]
    batches = (train[i : i + 1000]["text"] for i in range(0, len(train), 1000))
    tok = train_tokenizer((t for batch in batches for t in batch), args.vocab_size, args.output_dir)
    print(
        f"trained a {len(tok):,}-token byte-level BPE on {len(train):,} samples; saved to {args.output_dir}"
    )


def cmd_train(args: argparse.Namespace) -> None:
    import torch

    from .config import ModelConfig
    from .data import tokenize_and_pack
    from .train import TrainArgs, Trainer, build_model

    if args.block_size < 2:
        raise TrainError(f"--block-size: expected at least 2, got {args.block_size}")
    if args.lookup_tokens < 0:
        raise TrainError(f"--lookup-tokens: expected 0 (no table) or more, got {args.lookup_tokens}")
    tokenizer = load_tokenizer(args.tokenizer)
    corpus = load_corpus(data_spec(args))
    overrides = {f: getattr(args, f) for f in MODEL_FIELDS if getattr(args, f) is not None}
    config = ModelConfig.from_preset(args.preset, vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                                     bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
                                     max_position_embeddings=max(2048, args.block_size), **overrides)  # fmt: skip
    torch.manual_seed(args.seed)  # the initial weights are part of what --seed fixes
    model = build_model(config, args.init_from)
    if model.config.vocab_size < len(tokenizer):
        raise TrainError(
            f"--tokenizer: {len(tokenizer)} tokens, but the model's vocabulary has {model.config.vocab_size}"
        )
    train_blocks = tokenize_and_pack(corpus["train"], tokenizer, args.block_size, args.num_proc)["input_ids"]
    val_blocks = tokenize_and_pack(corpus["validation"], tokenizer, args.block_size, args.num_proc)[
        "input_ids"
    ]
    train_args = TrainArgs(
        output_dir=args.output_dir, max_steps=args.max_steps, num_train_epochs=args.num_train_epochs,
        batch_size=args.batch_size, gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.learning_rate, warmup_steps=args.warmup_steps, mixed_precision=args.mixed_precision,
        gradient_checkpointing=args.gradient_checkpointing, logging_steps=args.logging_steps,
        eval_steps=args.eval_steps, early_stopping_patience=args.early_stopping_patience,
        save_steps=args.save_steps, save_total_limit=args.save_total_limit, seed=args.seed, resume=args.resume,
        overwrite_output_dir=args.overwrite_output_dir, compile=args.compile, fsdp=args.fsdp,
    )  # fmt: skip
    trainer = Trainer(model, train_blocks, val_blocks, train_args, tokenizer.pad_token_id, tokenizer)
    print(f"model: {model.num_parameters():,} parameters, layers {model.config.layer_pattern}; "
          f"{len(train_blocks):,} training blocks of {args.block_size} tokens")  # fmt: skip
    result = trainer.train()
    best = result["best_val_loss"]
    print(
        f"done at step {result['step']}" + (f"; best validation loss {best:.4f}" if best is not None else "")
    )
    if args.lookup_tokens and trainer.accelerator.is_main_process:  # beside each model as it is saved
        from .checkpoint import load_model

        out = Path(args.output_dir)
        for model_dir in [d for d in (out, out / "best") if d.is_dir()]:
            # Read back as saved: one whole model, also where training sharded it across processes.
            saved = load_model(model_dir, device=trainer.accelerator.device)
            write_ngrams(saved, train_blocks, model_dir, args.lookup_tokens)


def write_ngrams(
    model: HybridLM, blocks: Sequence[Sequence[int]], model_dir: Path, max_tokens: int = PREDICTED_TOKENS
) -> None:
    """The table that prompt lookup drafts from where the text has no match: what `model` predicts
    after each position of up to `max_tokens` tokens of `blocks` (speculative.py)."""
    table = predicted_ngrams(model, blocks, max_tokens)
    table.save(model_dir / NGRAMS_NAME)
    print(
        f"prompt-lookup n-gram table: {len(table):,} contexts in {model_dir / NGRAMS_NAME} "
        f"(the model's predictions on up to {max_tokens:,} tokens)"
    )


def cmd_ngrams(args: argparse.Namespace) -> None:
    from .checkpoint import load_model
    from .data import tokenize_and_pack

    if args.max_tokens < 1:
        raise DataError(f"--max-tokens: expected a positive number, got {args.max_tokens}")
    model = load_model(args.model)
    tokenizer = load_tokenizer(args.model)
    if len(tokenizer) > model.config.vocab_size:
        raise CheckpointError(
            f"{args.model}: its tokenizer has {len(tokenizer)} tokens, the model {model.config.vocab_size}"
        )
    block_size = min(1024, model.config.max_position_embeddings)
    blocks = tokenize_and_pack(load_corpus(data_spec(args))["train"], tokenizer, block_size, args.num_proc)
    write_ngrams(model, blocks["input_ids"], Path(args.model), args.max_tokens)


def cmd_finetune(args: argparse.Namespace) -> None:
    from .finetune import FinetuneArgs, run_finetune
    from .train import TrainArgs

    lora = args.use_lora or args.qlora
    default_lr = 2e-4 if lora else 5e-5
    train_args = TrainArgs(
        output_dir=args.output_dir, max_steps=args.max_steps, num_train_epochs=args.num_train_epochs,
        batch_size=args.batch_size, gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=default_lr if args.learning_rate is None else args.learning_rate, warmup_steps=args.warmup_steps,
        weight_decay=0.0 if lora else 0.1, mixed_precision=args.mixed_precision,
        gradient_checkpointing=args.gradient_checkpointing, logging_steps=args.logging_steps, eval_steps=args.eval_steps,
        save_steps=args.save_steps, save_total_limit=args.save_total_limit, seed=args.seed, resume=args.resume,
        overwrite_output_dir=args.overwrite_output_dir,
    )  # fmt: skip
    targets = (
        [t.strip() for t in args.target_modules.split(",") if t.strip()] if args.target_modules else None
    )
    if args.lookup_tokens < 0:
        raise FinetuneError(f"--lookup-tokens: expected 0 (no table) or more, got {args.lookup_tokens}")

    def write_table(model_dir: Path, model: HybridLM, sequences: list[list[int]]) -> None:
        write_ngrams(model, sequences, model_dir, args.lookup_tokens)  # the tuned model's own predictions

    summary = run_finetune(FinetuneArgs(
        base=args.base, train=train_args, dataset=args.dataset, chat=args.chat, tokenizer=args.tokenizer,
        text_field=args.text_field, dataset_config=args.dataset_config, split=args.split, streaming=args.streaming,
        max_samples=args.max_samples, validation_split=args.validation_split,
        max_length=args.max_length, use_lora=args.use_lora, qlora=args.qlora, lora_r=args.lora_r,
        lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, target_modules=targets, merge=args.merge,
        train_embeddings=args.train_embeddings,
    ), write_table if args.lookup_tokens else None)  # fmt: skip
    kind = "adapter" if lora else "model"
    print(f"done at step {summary['step']}; {kind} in {args.output_dir}"
          + (f", merged model in {summary['merged_dir']}" if summary["merged_dir"] else ""))  # fmt: skip


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import DemoArgs, run_demo

    run_demo(DemoArgs(output_dir=args.output_dir, dataset=args.dataset, max_steps=args.max_steps,
                      preset=args.preset, vocab_size=args.vocab_size, batch_size=args.batch_size,
                      eval_blocks=args.eval_blocks, chat_steps=args.chat_steps,
                      chat_dataset=args.chat_dataset))  # fmt: skip


def add_template_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--system", help="a system prompt (with --template plain: a line of text before the prompt)"
    )
    p.add_argument("--template", choices=["auto", "chat", "plain"], default="auto",
                   help="chat: the tokenizer's chat template; plain: text continuation; auto: chat if chat-tuned")  # fmt: skip


def add_generation_args(p: argparse.ArgumentParser, temperature: float, max_new_tokens: int) -> None:
    p.add_argument("--model", required=True, help="model directory, or a LoRA adapter directory")
    p.add_argument("--adapter", help="a LoRA adapter directory to apply to the model")
    p.add_argument("--max-new-tokens", "--max-length", dest="max_new_tokens", type=int, default=max_new_tokens,
                   help="tokens to generate (--max-length is the seed's name for it)")  # fmt: skip
    p.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.9 if temperature else 1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off; the candidate count for contrastive search")
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--num-beams", type=int, default=1, help="> 1: beam search")
    p.add_argument("--length-penalty", type=float, default=1.0)
    p.add_argument("--penalty-alpha", type=float, default=0.0, help="> 0: contrastive search")
    add_lookup_arg(p)
    p.add_argument("--stop", action="append", default=[], type=unescape,
                   help=r"a stop string (repeatable); \n, \t, \r and \\ are read as escapes, e.g. --stop '\n\n'")  # fmt: skip
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cpu)")
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the decode step (for GPUs; a CPU's C step is faster)",
    )
    add_dtype_args(p)


def add_lookup_tokens_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--lookup-tokens",
        type=int,
        default=PREDICTED_TOKENS,
        help=f"training tokens the trained model predicts after, for --prompt-lookup's table "
        f"({NGRAMS_NAME}; default {PREDICTED_TOKENS:,}; 0: none)",
    )


def add_lookup_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt-lookup", type=int, default=0, metavar="N",
                   help="draft up to N tokens per pass from earlier text (prompt-lookup decoding; the draft grows "
                   "while drafts are accepted whole); greedy or sampled, the same tokens as without it (sampled: for "
                   "the same --seed), faster where the text repeats itself (off the CPU's C step, e.g. on a GPU, a "
                   "rejected draft costs a second pass)")  # fmt: skip


def add_dtype_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        help="the weights' dtype for generating (default: as saved, float32); bfloat16 halves what "
        "each token reads (on a CPU the C decode step sums in fp32: ~1.5x the tokens/s at batch 1), "
        "float16 is for GPUs",
    )
    p.add_argument(
        "--kv-cache-dtype",
        choices=("float32", "bfloat16"),
        help="the attention layers' cached keys and values (default: the model's dtype); "
        "bfloat16 halves their memory and what long contexts read per token",
    )


def unescape(text: str) -> str:
    r"""`\n`, `\t`, `\r` and `\\` as the characters they name: a shell passes "\n\n" as four
    characters, and a stop string of a backslash and an n is rarely what was meant."""
    return re.sub(r"\\([ntr\\])", lambda m: {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}[m.group(1)], text)


# GenerationConfig's fields as the flags that set them, for its one-line errors.
FLAG_OF_FIELD = {"max_new_tokens": "--max-new-tokens", "num_return_sequences": "-n/--num-return-sequences",
                 "stop_strings": "--stop"}  # fmt: skip


@contextmanager
def flag_errors() -> Iterator[None]:
    """A GenerationConfig error names the flag that set the field, not the field."""
    try:
        yield
    except GenerationError as e:
        field, _, rest = str(e).partition(": ")
        flag = FLAG_OF_FIELD.get(field, "--" + field.replace("_", "-"))
        raise GenerationError(f"{flag}: {rest}") from None


def generation_config(engine, args: argparse.Namespace, **extra):
    with flag_errors():
        return _generation_config(engine, args, **extra)


def _generation_config(engine, args: argparse.Namespace, **extra):
    top_k = args.top_k or (4 if args.penalty_alpha > 0 else 0)  # contrastive search's usual 4 candidates
    return engine.default_config(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=top_k,
        min_p=args.min_p, repetition_penalty=args.repetition_penalty, num_beams=args.num_beams,
        length_penalty=args.length_penalty, penalty_alpha=args.penalty_alpha, stop_strings=tuple(args.stop),
        seed=args.seed, prompt_lookup=args.prompt_lookup, **extra,
    )  # fmt: skip


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompt_file:
        path = Path(args.prompt_file)
        try:
            text = sys.stdin.read() if args.prompt_file == "-" else path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise GenerationError(f"{path}: cannot read the prompt file ({e})") from None
        jsonl = path.suffix == ".jsonl" or (args.prompt_file == "-" and _looks_like_jsonl(text))
        for n, line in enumerate(text.splitlines(), 1):
            if jsonl and line.strip():
                try:
                    prompt = json.loads(line)["prompt"]
                except (ValueError, KeyError, TypeError):
                    prompt = None
                if not isinstance(prompt, str):
                    raise GenerationError(f'{path}:{n}: expected a JSON object with a "prompt" string')
                prompts.append(prompt)
            elif line.strip():
                prompts.append(line)
    if not prompts:
        raise GenerationError("--prompt: give at least one prompt (or --prompt-file)")
    return prompts


def _looks_like_jsonl(text: str) -> bool:
    """Prompts piped on stdin are JSONL when the first non-blank line is a JSON object with a
    "prompt" string (a prompt that merely looks like JSON stays a prompt)."""
    first = next((line for line in text.splitlines() if line.strip()), "")
    try:
        record = json.loads(first)
    except ValueError:
        return False
    return isinstance(record, dict) and isinstance(record.get("prompt"), str)


def cmd_generate(args: argparse.Namespace) -> int:
    """Ctrl-C stops generating and prints what was generated (finish reason "cancelled", exit status
    130); a second Ctrl-C interrupts at once."""
    from .chat import ChatSession
    from .generation import load_engine, sigint_cancels

    engine = load_engine(args.model, args.adapter, args.device, args.compile, args.kv_cache_dtype, args.dtype)
    prompts = read_prompts(args)
    config = generation_config(engine, args, num_return_sequences=args.num_return_sequences)
    if args.stream and (len(prompts) > 1 or config.num_return_sequences > 1 or config.num_beams > 1):
        raise GenerationError("--stream: one prompt and one sequence, without beam search")
    if args.stream and args.json:
        raise GenerationError(
            "--stream and --json: choose one (--json prints one object once generation ends)"
        )
    # Each prompt as chat renders a user turn: through the chat template (the completion is the
    # reply), or as plain text after the system prompt, if any (the completion continues it).
    template = template_mode(args, engine)
    session = ChatSession(engine, config, args.system, template)
    inputs = [session.render([{"role": "user", "content": p}]) for p in prompts]
    echo = template == "plain" and not args.system  # the output shows the prompt before its continuation
    context = engine.model.config.max_position_embeddings
    longest = max(len(ids) for ids in inputs)
    if longest > context:  # decoding still works (as in transformers), but past what the model learned
        print(f"mamba-slm: note: a prompt of {longest} tokens is longer than the model's {context}-token context; "
              "text past the context may degrade", file=sys.stderr)  # fmt: skip
    if args.compile:  # compile before the clock starts, so the speed printed is the generation's
        start = time.perf_counter()
        # the first batch's rows (prompts x samples or beams), so the timed run meets no new shape
        first_batch = inputs[: args.batch_size or engine.default_batch_size(config, len(inputs))]
        engine.generate(first_batch, replace(config, max_new_tokens=2))
        print(f"mamba-slm: compiled the decode step in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    start = time.perf_counter()
    with sigint_cancels() as cancel:
        if args.stream:
            print(prompts[0] if echo else "", end="", flush=True)
            for delta in engine.stream(inputs[0], config, cancel):
                print(delta, end="", flush=True)
            print()
            completions = [engine.last_completion]
        else:
            completions = engine.generate(inputs, config, cancel, args.batch_size)
    print_completions(args, prompts, completions, time.perf_counter() - start, echo)
    if cancel.is_set():
        print("mamba-slm: interrupted; the output holds what was generated until then", file=sys.stderr)
        return 130
    return 0


def print_completions(
    args: argparse.Namespace, prompts: list[str], completions: list, seconds: float, echo: bool
) -> None:
    tokens = sum(len(c.tokens) for c in completions)
    if args.json:
        results = [{"prompt": prompts[c.prompt_index], "text": c.text, "tokens": c.tokens, "finish_reason": c.finish_reason,
                    "score": c.score, "prompt_tokens": c.prompt_tokens} for c in completions]  # fmt: skip
        print(json.dumps({"completions": results, "seconds": round(seconds, 4),
                          "tokens_per_second": round(tokens / seconds, 2)}, ensure_ascii=False))  # fmt: skip
        return
    if not args.stream:
        for c in completions:
            prefix = prompts[c.prompt_index] if echo else ""
            print(f"Prompt: {prompts[c.prompt_index]}\n\nGenerated:\n{prefix}{c.text}")
            print(f"({len(c.tokens)} tokens generated, {c.finish_reason})\n")
    print(f"Generation time: {seconds:.2f}s\nTokens: {tokens}\nSpeed: {tokens / seconds:.1f} tokens/s")


def template_mode(args: argparse.Namespace, engine) -> str:
    """--template resolved: "chat" (the tokenizer's chat template) or "plain" (text continuation);
    auto is chat for a chat-tuned model whose tokenizer has a template."""
    from .chat import is_chat_model

    template = args.template
    if template == "auto":
        chat = is_chat_model(args.model) or (args.adapter is not None and is_chat_model(args.adapter))
        template = "chat" if chat and engine.tokenizer.chat_template else "plain"
    if template == "chat" and not engine.tokenizer.chat_template:
        raise GenerationError(f"--template chat: {args.model} has a tokenizer without a chat template")
    return template


def cmd_chat(args: argparse.Namespace) -> None:
    from .chat import ChatSession, run_chat
    from .generation import load_engine

    if args.num_beams > 1:  # a chat streams its replies, which beam search cannot
        raise GenerationError("--num-beams: chat streams one reply at a time; beam search is for generate")
    engine = load_engine(args.model, args.adapter, args.device, args.compile, args.kv_cache_dtype, args.dtype)
    session = ChatSession(engine, generation_config(engine, args), args.system, template_mode(args, engine),
                          engine.model.config.max_position_embeddings)  # fmt: skip
    run_chat(session)


def cmd_bench(args: argparse.Namespace) -> None:
    from .bench import BenchArgs, format_report, greedy, run_bench
    from .generation import load_engine

    with flag_errors():  # before the model loads
        greedy(args.max_new_tokens, args.prompt_lookup)
    engine = load_engine(args.model, args.adapter, args.device, args.compile, args.kv_cache_dtype, args.dtype)
    bench_args = BenchArgs(max_new_tokens=args.max_new_tokens, positions=args.positions,
                           batch_sizes=args.batch_sizes, compare_hf=args.compare == "hf",
                           prompt_lookup=args.prompt_lookup)  # fmt: skip
    report = run_bench(engine, bench_args)
    print(json.dumps(report, indent=2) if args.json else format_report(report))


def int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="mamba-slm", description="Hybrid Mamba-Transformer small language models."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    data = commands.add_parser("data", help="datasets").add_subparsers(dest="action", required=True)
    prepare = data.add_parser("prepare", help="load a dataset and save train/validation splits")
    add_data_args(prepare)
    prepare.add_argument("--output-dir", required=True)
    prepare.set_defaults(func=cmd_data_prepare)

    tok = commands.add_parser("tokenizer", help="tokenizers").add_subparsers(dest="action", required=True)
    train = tok.add_parser("train", help="train a byte-level BPE tokenizer")
    add_data_args(train)
    train.add_argument("--vocab-size", type=int, default=8192)
    train.add_argument("--output-dir", required=True)
    train.set_defaults(func=cmd_tokenizer_train)

    tr = commands.add_parser("train", help="pre-train a hybrid model")
    add_data_args(tr)
    tr.add_argument("--tokenizer", required=True, help="trained tokenizer directory or hub id")
    tr.add_argument("--output-dir", required=True)
    tr.add_argument("--preset", default="small", help="tiny | small | base")
    tr.add_argument("--init-from", help="continue from this model directory")
    for field in MODEL_FIELDS:
        kind = (
            float
            if field == "attn_ratio"
            else (str if field in ("layer_pattern", "mixer", "pos_encoding") else int)
        )
        tr.add_argument("--" + field.replace("_", "-"), type=kind, help="override the preset")
    tr.add_argument("--block-size", type=int, default=256)
    tr.add_argument("--batch-size", type=int, default=8)
    tr.add_argument("--gradient-accumulation-steps", type=int, default=1)
    tr.add_argument("--learning-rate", type=float, default=5e-4)
    tr.add_argument("--warmup-steps", type=int, default=50)
    tr.add_argument("--max-steps", type=int)
    tr.add_argument("--num-train-epochs", type=float, default=1.0)
    precision = tr.add_mutually_exclusive_group()
    precision.add_argument("--bf16", dest="mixed_precision", action="store_const", const="bf16")
    precision.add_argument("--fp16", dest="mixed_precision", action="store_const", const="fp16")
    tr.set_defaults(mixed_precision="no")
    tr.add_argument("--gradient-checkpointing", action="store_true")
    tr.add_argument("--logging-steps", type=int, default=10)
    tr.add_argument("--eval-steps", type=int, default=200)
    tr.add_argument("--early-stopping-patience", type=int)
    tr.add_argument("--save-steps", type=int, default=500)
    tr.add_argument("--save-total-limit", type=int, default=2)
    tr.add_argument(
        "--resume", action="store_true", help="continue from the latest checkpoint in --output-dir"
    )
    tr.add_argument(
        "--overwrite-output-dir", action="store_true",
        help="start over in an --output-dir that holds an earlier run's checkpoints (deletes them)",
    )  # fmt: skip
    tr.add_argument("--compile", action="store_true", help="torch.compile the model (opt-in)")
    add_lookup_tokens_arg(tr)
    tr.add_argument(
        "--fsdp",
        action="store_true",
        help="shard the model across processes (under accelerate launch/torchrun)",
    )
    tr.set_defaults(func=cmd_train)

    ngrams = commands.add_parser(
        "ngrams",
        help=f"count what the model predicts after a corpus's n-grams into MODEL/{NGRAMS_NAME}, for "
        "--prompt-lookup's drafts",
    )
    add_data_args(ngrams)
    ngrams.add_argument(
        "--model", required=True, help="model directory (train writes a table from its training data)"
    )
    ngrams.add_argument(
        "--max-tokens",
        type=int,
        default=PREDICTED_TOKENS,
        help=f"corpus tokens the model predicts after (default {PREDICTED_TOKENS:,})",
    )
    ngrams.set_defaults(func=cmd_ngrams)

    ft = commands.add_parser("finetune", help="fine-tune a model: LoRA/QLoRA or full, text or chat SFT")
    ft.add_argument("--base", required=True, help="the pre-trained model directory")
    ft.add_argument("--output-dir", required=True)
    ft.add_argument("--dataset", help="chat: chatterbot (default), .jsonl/.json/.yml; text: as for train")
    ft.add_argument("--chat", action="store_true", help="conversations, loss on assistant tokens only")
    ft.add_argument("--tokenizer", help="default: the base directory's tokenizer")
    ft.add_argument("--text-field", default="text")
    ft.add_argument(
        "--dataset-config", help="text data from the hub: its configuration, e.g. wikitext-2-raw-v1"
    )
    ft.add_argument("--split", default="train", help="text data from the hub: the split to train on")
    ft.add_argument("--streaming", action="store_true", help="text data from the hub: stream it")
    ft.add_argument("--max-samples", type=int)
    ft.add_argument("--validation-split", type=float, default=0.1, help="fraction held out for evaluation")
    ft.add_argument("--max-length", type=int, default=512, help="tokens per conversation / text block")
    ft.add_argument("--use-lora", action="store_true", help="train a LoRA adapter (default: full)")
    ft.add_argument("--qlora", action="store_true", help="LoRA on a 4-bit NF4 base (CUDA + bitsandbytes)")
    ft.add_argument("--lora-r", type=int, default=8)
    ft.add_argument("--lora-alpha", type=float, default=16.0)
    ft.add_argument("--lora-dropout", type=float, default=0.05)
    ft.add_argument("--target-modules", help="comma-separated; default: Mamba, attention and MLP projections")
    ft.add_argument("--merge", action="store_true", help="also write OUTPUT_DIR/merged (a full model)")
    ft.add_argument("--train-embeddings", action="store_true", help="LoRA: also train the token embeddings")
    for flag, kind, default in (("--batch-size", int, 8), ("--gradient-accumulation-steps", int, 1),
                                ("--learning-rate", float, None), ("--warmup-steps", int, 20), ("--max-steps", int, None),
                                ("--num-train-epochs", float, 1.0), ("--logging-steps", int, 10),
                                ("--eval-steps", int, 100), ("--save-steps", int, 500), ("--save-total-limit", int, 2),
                                ("--seed", int, 0)):  # fmt: skip
        ft.add_argument(flag, type=kind, default=default)
    precision = ft.add_mutually_exclusive_group()
    precision.add_argument("--bf16", dest="mixed_precision", action="store_const", const="bf16")
    precision.add_argument("--fp16", dest="mixed_precision", action="store_const", const="fp16")
    ft.set_defaults(mixed_precision="no", func=cmd_finetune)
    ft.add_argument("--gradient-checkpointing", action="store_true")
    ft.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    ft.add_argument("--overwrite-output-dir", action="store_true",
                    help="start over in an --output-dir that holds an earlier run's checkpoints (deletes them)")  # fmt: skip
    add_lookup_tokens_arg(ft)

    gen = commands.add_parser("generate", help="generate text from prompts")
    add_generation_args(gen, temperature=0.8, max_new_tokens=64)
    gen.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    gen.add_argument(
        "--prompt-file", help='prompts, one per line (or JSONL with a "prompt" field); - reads standard input'
    )
    gen.add_argument("-n", "--num-return-sequences", type=int, default=1, help="samples per prompt")
    gen.add_argument("--stream", action="store_true", help="print the text as it is generated")
    gen.add_argument(
        "--batch-size", type=int, help="prompts decoded together (default: 16 rows on a CPU, 256 on a GPU)"
    )
    gen.add_argument("--json", action="store_true", help="print one JSON object with every completion")
    add_template_args(gen)
    gen.set_defaults(func=cmd_generate)

    chat = commands.add_parser("chat", help="chat with a model in the terminal")
    add_generation_args(chat, temperature=0.8, max_new_tokens=256)
    add_template_args(chat)
    chat.set_defaults(func=cmd_chat)

    bench = commands.add_parser("bench", help="generation speed: tokens/s, latency, batch throughput, memory")
    bench.add_argument("--model", required=True)
    bench.add_argument("--adapter")
    bench.add_argument("--device")
    bench.add_argument("--compile", action="store_true", help="compile the decode step first")
    add_dtype_args(bench)
    add_lookup_arg(bench)
    bench.add_argument("--max-new-tokens", type=int, default=100)
    bench.add_argument("--positions", type=int_list, default=(128, 1024, 4096),
                       help="context positions for per-token latency")  # fmt: skip
    bench.add_argument("--batch-sizes", type=int_list, default=(1, 4, 16))
    bench.add_argument(
        "--compare", choices=["hf"], help="hf: also run transformers' generate on the same weights"
    )
    bench.add_argument("--json", action="store_true")
    bench.set_defaults(func=cmd_bench)

    demo = commands.add_parser("demo", help="the whole workflow on the built-in corpus (make demo)")
    demo.add_argument("--output-dir", default="runs/demo")
    demo.add_argument("--dataset", default="shakespeare")
    demo.add_argument("--preset", default="small")
    demo.add_argument("--vocab-size", type=int, default=4096)
    demo.add_argument("--batch-size", type=int, default=16)
    demo.add_argument("--max-steps", type=int, default=260)
    demo.add_argument("--eval-blocks", type=int, default=200)
    demo.add_argument("--chat-steps", type=int, default=200, help="LoRA chat fine-tuning steps (0: skip)")
    demo.add_argument("--chat-dataset", default="chatterbot", help="conversations for the chat fine-tuning")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int | None] = args.func
    try:
        status = func(args)
    except USER_ERRORS as e:
        print(f"mamba-slm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mamba-slm: interrupted", file=sys.stderr)
        return 130
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
