"""The command line: the flow users run, and one-line errors with a non-zero exit."""

import json
import subprocess
import sys

from transformers import AutoTokenizer

from mamba_slm.cli import main


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mamba_slm", *args], capture_output=True, text=True)


def test_tokenizer_train_and_data_prepare(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"Sentence {i}: the quick brown fox." for i in range(60)))
    assert (
        main(
            [
                "tokenizer",
                "train",
                "--dataset",
                str(corpus),
                "--vocab-size",
                "300",
                "--output-dir",
                str(tmp_path / "tok"),
            ]
        )
        == 0
    )
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert tok.decode(tok("the quick brown fox")["input_ids"]) == "the quick brown fox"
    assert main(["data", "prepare", "--dataset", str(corpus), "--output-dir", str(tmp_path / "data")]) == 0
    assert json.loads((tmp_path / "data" / "dataset_dict.json").read_text())["splits"] == [
        "train",
        "validation",
    ]


def test_bad_input_gives_one_line_and_exit_2(tmp_path):
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text(json.dumps({"body": "x"}) + "\n")
    cases = [
        (
            [
                "data",
                "prepare",
                "--dataset",
                str(tmp_path / "missing.txt"),
                "--output-dir",
                str(tmp_path / "o"),
            ],
            "no such file",
        ),
        (
            ["data", "prepare", "--dataset", str(jsonl), "--output-dir", str(tmp_path / "o")],
            "no field 'text'",
        ),
        (
            [
                "tokenizer",
                "train",
                "--dataset",
                str(jsonl),
                "--text-field",
                "body",
                "--vocab-size",
                "10",
                "--output-dir",
                str(tmp_path / "t"),
            ],
            "need at least 2",
        ),
    ]
    for args, message in cases:
        result = run(*args)
        assert result.returncode == 2, result.stderr
        last = result.stderr.strip().splitlines()[-1]  # progress bars may come first
        assert "Traceback" not in result.stderr
        assert last.startswith("mamba-slm: error:") and message in last, result.stderr


def test_help():
    result = run("--help")
    assert result.returncode == 0 and "tokenizer" in result.stdout


def test_demo_end_to_end_on_a_small_corpus(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"ROMEO:\nShe speaks {i} times, yet she says nothing." for i in range(200)))
    out = tmp_path / "demo"
    args = ["demo", "--dataset", str(corpus), "--output-dir", str(out), "--preset", "tiny", "--vocab-size", "300",
            "--max-steps", "30", "--batch-size", "8", "--eval-blocks", "10"]  # fmt: skip
    assert main(args) == 0
    report = (out / "report.md").read_text()
    assert "held-out perplexity" in report and "## Samples" in report
    assert (out / "model" / "model.safetensors").exists() and (out / "tokenizer" / "tokenizer.json").exists()


def test_demo_into_an_unwritable_place_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = run("demo", "--output-dir", str(blocker / "demo"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "cannot create the output directory" in result.stderr.strip().splitlines()[-1]
