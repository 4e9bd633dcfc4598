"""The command line: the flow users run, and one-line errors with a non-zero exit."""

import io
import json
import shutil
import signal
import subprocess
import sys
import time

from transformers import AutoTokenizer

from mamba_slm.bench import format_report
from mamba_slm.cli import main
from mamba_slm.data import DataSpec, load_corpus, tokenize_and_pack
from mamba_slm.generation import load_engine
from mamba_slm.speculative import predicted_ngrams


def run(*args: str, input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mamba_slm", *args], capture_output=True, text=True, input=input
    )


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
    chat = tmp_path / "chat.jsonl"  # a local stand-in for the built-in ChatterBot conversations
    chat.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": f"Who speaks {i} times?"},
                                                       {"role": "assistant", "content": "Romeo."}]})
                              for i in range(30)))  # fmt: skip
    args = ["demo", "--dataset", str(corpus), "--output-dir", str(out), "--preset", "tiny", "--vocab-size", "300",
            "--max-steps", "30", "--batch-size", "8", "--eval-blocks", "10", "--chat-steps", "4",
            "--chat-dataset", str(chat)]  # fmt: skip
    assert main(args) == 0
    report = (out / "report.md").read_text()
    assert "held-out perplexity" in report and "## Samples" in report
    assert "## Chat fine-tuning (LoRA)" in report and "**User:** Who speaks" in report
    assert (out / "chat-lora" / "adapter_model.safetensors").exists()
    assert (out / "model" / "model.safetensors").exists() and (out / "tokenizer" / "tokenizer.json").exists()
    assert (out / "model" / "lookup_ngrams.safetensors").exists()  # what --prompt-lookup drafts from
    assert (out / "chat-lora" / "lookup_ngrams.safetensors").exists()  # the chat model's own


def test_demo_into_an_unwritable_place_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = run("demo", "--output-dir", str(blocker / "demo"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "cannot create the output directory" in result.stderr.strip().splitlines()[-1]


def test_generate_json_prompt_file_and_stream(tiny_model_dir, tmp_path, capsys, monkeypatch):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "To be"}\n\n{"prompt": "Café"}\n')
    args = ["generate", "--model", str(tiny_model_dir), "--max-new-tokens", "6", "--temperature", "0"]
    assert main([*args, "--prompt-file", str(prompts), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [c["prompt"] for c in out["completions"]] == ["To be", "Café"]
    assert all(len(c["tokens"]) == 6 and c["finish_reason"] == "length" for c in out["completions"])
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert [c["prompt_tokens"] for c in out["completions"]] == [len(tok.encode(p)) for p in ("To be", "Café")]
    assert main([*args, "--prompt", "To be", "--stream"]) == 0
    streamed = capsys.readouterr().out.splitlines()[0]
    assert streamed == "To be" + out["completions"][0]["text"].split("\n")[0]
    assert main([*args, "--prompt", "To be", "--num-beams", "3", "-n", "2", "--json"]) == 0
    beams = json.loads(capsys.readouterr().out)["completions"]
    assert len(beams) == 2 and beams[0]["score"] >= beams[1]["score"]
    piped = run(*args, "--prompt-file", "-", "--json", input="To be\n\nCafé\n")  # prompts from standard input
    assert [c["tokens"] for c in json.loads(piped.stdout)["completions"]] == [
        c["tokens"] for c in out["completions"]
    ]
    monkeypatch.setattr("sys.stdin", io.StringIO(prompts.read_text()))  # JSONL on stdin is read as JSONL
    assert main([*args, "--prompt-file", "-", "--json"]) == 0
    from_stdin = json.loads(capsys.readouterr().out)["completions"]
    assert [(c["prompt"], c["tokens"]) for c in from_stdin] == [
        (c["prompt"], c["tokens"]) for c in out["completions"]
    ]
    assert main([*args, "--prompt-file", str(prompts), "--json", "--kv-cache-dtype", "bfloat16"]) == 0
    half = json.loads(capsys.readouterr().out)["completions"]
    assert [len(c["tokens"]) for c in half] == [6, 6]
    assert main([*args, "--prompt-file", str(prompts), "--json", "--dtype", "bfloat16"]) == 0
    bf16 = json.loads(capsys.readouterr().out)["completions"]
    assert [len(c["tokens"]) for c in bf16] == [6, 6]
    assert main([*args, "--prompt-file", str(prompts), "--json", "--prompt-lookup", "3"]) == 0
    looked_up = json.loads(capsys.readouterr().out)["completions"]
    assert [c["tokens"] for c in looked_up] == [c["tokens"] for c in out["completions"]]


def test_generate_renders_each_prompt_as_a_user_turn_for_a_chat_model(tiny_model_dir, tmp_path, capsys):
    chat_model = tmp_path / "chat"
    shutil.copytree(tiny_model_dir, chat_model)
    (chat_model / "training_args.json").write_text('{"chat": true}')  # what chat fine-tuning writes
    engine = load_engine(str(tiny_model_dir))
    tok, config = engine.tokenizer, engine.default_config(max_new_tokens=5, temperature=0)

    def generated(*extra: str) -> dict:
        argv = [
            "generate",
            "--prompt",
            "Hello there",
            "--max-new-tokens",
            "5",
            "--temperature",
            "0",
            "--json",
        ]
        assert main([*argv, *extra]) == 0
        return json.loads(capsys.readouterr().out)["completions"][0]

    turn = tok.apply_chat_template([{"role": "user", "content": "Hello there"}], add_generation_prompt=True,
                                   tokenize=False)  # fmt: skip
    ids = tok.encode(turn, add_special_tokens=False)
    reply = generated("--model", str(chat_model))  # auto: the chat template, as `chat` uses it
    assert reply["prompt_tokens"] == len(ids) and reply["tokens"] == engine.generate([ids], config)[0].tokens
    plain = generated("--model", str(chat_model), "--template", "plain")
    assert plain["tokens"] == engine.generate(["Hello there"], config)[0].tokens
    assert generated("--model", str(tiny_model_dir))["tokens"] == plain["tokens"]  # not chat-tuned: plain
    system = generated("--model", str(chat_model), "--system", "Be brief.")
    with_system = tok.apply_chat_template([{"role": "system", "content": "Be brief."},
                                           {"role": "user", "content": "Hello there"}],
                                          add_generation_prompt=True, tokenize=False)  # fmt: skip
    assert system["prompt_tokens"] == len(tok.encode(with_system, add_special_tokens=False))


def test_a_prompt_longer_than_the_context_gets_a_note_not_an_error(tiny_model_dir):
    long_prompt = "To be, or not to be. " * 200  # over the tiny model's 512 positions
    result = run("generate", "--model", str(tiny_model_dir), "--prompt", long_prompt, "--max-new-tokens", "2",
                 "--temperature", "0")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "longer than the model's 512-token context" in result.stderr and "Tokens: " in result.stdout
    short = run("generate", "--model", str(tiny_model_dir), "--prompt", "To be", "--max-new-tokens", "2")
    assert short.returncode == 0 and "note:" not in short.stderr


def test_ctrl_c_ends_generate_with_what_was_generated(tiny_model_dir):
    """The first Ctrl-C stops generating: the text so far and the timing are printed, exit 130."""
    # greedy never stops on its own on this model
    argv = ["generate", "--model", str(tiny_model_dir), "--prompt", "To be", "--max-new-tokens", "1000000",
            "--temperature", "0", "--stream"]  # fmt: skip
    child = subprocess.Popen([sys.executable, "-m", "mamba_slm", *argv], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert child.stdout.read(5) == "To be"  # the echo: generation has started
    time.sleep(0.5)
    child.send_signal(signal.SIGINT)
    out, err = child.communicate(timeout=60)
    assert child.returncode == 130, err
    assert "Tokens: " in out and "Traceback" not in err
    assert (
        err.strip().splitlines()[-1]
        == "mamba-slm: interrupted; the output holds what was generated until then"
    )


def test_generate_and_bench_bad_input_is_one_line(tiny_model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no prompt field"}\n')
    not_text = tmp_path / "numbers.jsonl"
    not_text.write_text('{"prompt": "fine"}\n{"prompt": 5}\n')
    cases = [
        (["generate", "--model", str(tiny_model_dir), "--prompt-file", str(not_text)], "numbers.jsonl:2"),
        (["generate", "--model", str(tmp_path / "missing"), "--prompt", "x"], "no such model directory"),
        (["generate", "--model", str(tiny_model_dir), "--prompt-file", str(bad)], "bad.jsonl:1"),
        (["generate", "--model", str(tiny_model_dir), "--prompt", "x", "--top-p", "0"], "--top-p: expected"),
        (
            ["generate", "--model", str(tiny_model_dir), "--prompt", "x", "--device", "nonsense"],
            "--device nonsense",
        ),
        (
            ["generate", "--model", str(tiny_model_dir), "--prompt", "x", "--stream", "--num-beams", "2"],
            "--stream",
        ),
        (["generate", "--model", str(tiny_model_dir), "--prompt", "x", "--kv-cache-dtype", "int8"], "int8"),
        (["bench", "--model", str(tiny_model_dir), "--dtype", "int4"], "--dtype: invalid choice"),
        (["bench", "--model", str(tiny_model_dir), "--prompt-lookup", "-1"], "--prompt-lookup: expected"),
    ]
    in_process = [
        (["generate", "--model", str(tiny_model_dir), "--prompt", "x", "--stream", "--json"], "--stream and --json"),
        (["generate", "--model", str(tiny_model_dir), "--prompt", "x", "--penalty-alpha", "0.6", "-n", "2"],
         "-n/--num-return-sequences: contrastive search"),
        (["chat", "--model", str(tiny_model_dir), "--num-beams", "2"], "--num-beams"),
        (["generate", "--model", str(tiny_model_dir), "--prompt", "x", "--num-beams", "2", "--prompt-lookup", "4"],
         "--prompt-lookup: greedy decoding or sampling"),
    ]  # fmt: skip
    for argv, message in in_process:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    for argv, message in cases:
        result = run(*argv)
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_bench_reports_every_measurement(tiny_model_dir):
    result = run("bench", "--model", str(tiny_model_dir), "--max-new-tokens", "8", "--positions", "16,64",
                 "--batch-sizes", "1,4", "--compare", "hf", "--prompt-lookup", "2", "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert len(report["seed_benchmark"]["runs"]) == 5 and report["seed_benchmark"]["peak_tokens_per_s"] > 0
    assert set(report["latency_ms"]) == {"16", "64"} and set(report["decode_tokens_per_s"]) == {"1", "4"}
    assert report["latency_ratio"]["64"]["blocks"] == 8 and report["throughput_ratio"]["4"]["median"] > 0
    assert "latency vs ctx 16, median of 8 paired blocks (quartiles): ctx 64 " in format_report(report)
    assert "throughput vs batch 1, median of 8 paired blocks (quartiles): batch 4 " in format_report(report)
    assert report["prefill"]["time_to_first_token_ms"] > 0 and report["peak_memory_mb"] > 0
    assert report["transformers_generate"]["speedup"] > 0
    assert (report["dtype"], report["device"]) == ("float32", "cpu") and "cpu, float32" in format_report(
        report
    )
    assert report["context_length"] == 512 and "beyond" not in format_report(report)
    assert "Total tokens: 40\n" in format_report(report)  # the seed's summary lines: 5 prompts x 8 tokens
    assert "prompt lookup: up to 2 drafted tokens" in format_report(report)  # the seed benchmark's setting
    assert "refuses prompt lookup" in format_report(report)
    text = format_report({**report, "context_length": 32})  # positions past the trained context are flagged
    assert "64: beyond the model's 32-token context" in text and "16," not in text.split("(")[-1]


def test_stop_strings_on_the_command_line_read_backslash_escapes(tiny_model_dir):
    from mamba_slm.cli import build_parser

    argv = [
        "generate",
        "--model",
        str(tiny_model_dir),
        "--prompt",
        "x",
        "--stop",
        r"\n\n",
        "--stop",
        r"a\\n\tb",
    ]
    assert build_parser().parse_args(argv).stop == ["\n\n", "a\\n\tb"]


def test_generate_compiles_before_the_clock_starts(tiny_model_dir, capsys, monkeypatch):
    """The warm-up generation (which compiles) runs before the timed one's clock starts."""
    import mamba_slm.cli as cli
    from mamba_slm import HybridLM
    from mamba_slm.generation import Engine

    events, real_generate, ticks = [], Engine.generate, iter(range(1000))
    monkeypatch.setattr(HybridLM, "compile_decode", lambda self, mode=None: None)  # no real compile: fast
    monkeypatch.setattr(cli.time, "perf_counter", lambda: events.append("clock") or float(next(ticks)))
    monkeypatch.setattr(Engine, "generate", lambda self, prompts, config, *a: events.append(
        ("generate", len(prompts), config.num_return_sequences, config.max_new_tokens))
        or real_generate(self, prompts, config, *a))  # fmt: skip
    argv = ["generate", "--model", str(tiny_model_dir), "--prompt", "To be", "--prompt", "Or not",
            "--max-new-tokens", "4", "--compile", "-n", "2"]  # fmt: skip
    assert main(argv) == 0
    # the warm-up runs the timed run's first batch (2 prompts x 2 samples) for 2 tokens, off the clock
    assert events == ["clock", ("generate", 2, 2, 2), "clock", "clock", ("generate", 2, 2, 4), "clock"]
    assert "mamba-slm: compiled the decode step in " in capsys.readouterr().err


def test_ngrams_writes_the_table_that_prompt_lookup_drafts_from(tiny_model_dir, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(["To be, or not to be, that is the question."] * 40))
    assert main(["ngrams", "--model", str(model), "--dataset", str(corpus), "--max-tokens", "100"]) == 0
    assert "prompt-lookup n-gram table" in capsys.readouterr().out
    engine = load_engine(str(model))
    # what the model itself predicts after the corpus's contexts, from ~100 tokens of it
    split = load_corpus(DataSpec(dataset=str(corpus)))["train"]
    blocks = tokenize_and_pack(split, engine.tokenizer, engine.model.config.max_position_embeddings)[
        "input_ids"
    ]
    want = predicted_ngrams(engine.model, blocks, max_tokens=100)
    assert engine.ngrams.next_token == want.next_token and len(want) > 0
    args = [
        "generate",
        "--model",
        str(model),
        "--prompt",
        "To be",
        "--max-new-tokens",
        "8",
        "--temperature",
        "0",
    ]
    assert main([*args, "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)["completions"][0]["tokens"]
    assert main([*args, "--prompt-lookup", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["completions"][0]["tokens"] == plain
    result = run("ngrams", "--model", str(tmp_path / "missing"), "--dataset", str(corpus))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "missing" in result.stderr
    result = run("ngrams", "--model", str(model), "--dataset", str(corpus), "--max-tokens", "0")
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "mamba-slm: error: --max-tokens: expected a positive number, got 0"
    ]
