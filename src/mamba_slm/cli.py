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
from .tokenizer import TokenizerError, train_tokenizer

USER_ERRORS = (DataError, TokenizerError, ConfigError, CheckpointError)


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


def data_spec(args: argparse.Namespace) -> DataSpec:
    return DataSpec(
        dataset=args.dataset, dataset_config=args.dataset_config, split=args.split, text_field=args.text_field,
        max_samples=args.max_samples, validation_split=args.validation_split, streaming=args.streaming, seed=args.seed,
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
