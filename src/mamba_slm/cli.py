"""`mamba-slm`: a map from subcommands to the modules' functions.

Every command has `--help`; bad input ends with one line on stderr (`mamba-slm: error: ...`)
and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from .checkpoint import CheckpointError
from .config import ConfigError
from .data import DataError, DataSpec, load_corpus
from .tokenizer import TokenizerError, load_tokenizer, train_tokenizer
from .train import TrainError

USER_ERRORS = (DataError, TokenizerError, ConfigError, CheckpointError, TrainError)
MODEL_FIELDS = ("d_model", "n_layers", "layer_pattern", "attn_ratio", "mixer", "d_state", "head_dim", "n_heads",
                "n_kv_heads", "d_intermediate", "chunk_size", "pos_encoding", "sliding_window")  # fmt: skip


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
    corpus = load_corpus(data_spec(args))
    if args.streaming:
        print(f"{args.dataset}: streaming; nothing saved")
        return
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
        compile=args.compile, fsdp=args.fsdp,
    )  # fmt: skip
    trainer = Trainer(model, train_blocks, val_blocks, train_args, tokenizer.pad_token_id, tokenizer)
    print(f"model: {model.num_parameters():,} parameters, layers {model.config.layer_pattern}; "
          f"{len(train_blocks):,} training blocks of {args.block_size} tokens")  # fmt: skip
    result = trainer.train()
    best = result["best_val_loss"]
    print(
        f"done at step {result['step']}" + (f"; best validation loss {best:.4f}" if best is not None else "")
    )


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import DemoArgs, run_demo

    run_demo(DemoArgs(output_dir=args.output_dir, dataset=args.dataset, max_steps=args.max_steps,
                      preset=args.preset, vocab_size=args.vocab_size, batch_size=args.batch_size,
                      eval_blocks=args.eval_blocks))  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
    tr.add_argument("--compile", action="store_true", help="torch.compile the model (opt-in)")
    tr.add_argument(
        "--fsdp",
        action="store_true",
        help="shard the model across processes (under accelerate launch/torchrun)",
    )
    tr.set_defaults(func=cmd_train)

    demo = commands.add_parser("demo", help="the whole workflow on the built-in corpus (make demo)")
    demo.add_argument("--output-dir", default="runs/demo")
    demo.add_argument("--dataset", default="shakespeare")
    demo.add_argument("--preset", default="small")
    demo.add_argument("--vocab-size", type=int, default=4096)
    demo.add_argument("--batch-size", type=int, default=16)
    demo.add_argument("--max-steps", type=int, default=260)
    demo.add_argument("--eval-blocks", type=int, default=200)
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], None] = args.func
    try:
        func(args)
    except USER_ERRORS as e:
        print(f"mamba-slm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mamba-slm: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
