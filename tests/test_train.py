"""The training loop: learning, bf16, accumulation, exact resume after kill -9, clear errors."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from mamba_slm import HybridLM, ModelConfig
from mamba_slm.speculative import NGRAMS_NAME, CorpusNgrams
from mamba_slm.train import TrainArgs, Trainer, TrainError, lr_factor

TEXT = "\n\n".join(
    f"The king said {i} times that the queen was fair and the night was long." for i in range(300)
)


def blocks(n=40, length=33, seed=0):
    g = torch.Generator().manual_seed(seed)
    pattern = torch.randint(1, 256, (8,), generator=g)
    return [pattern.repeat(5)[i % 8 : i % 8 + length].tolist() for i in range(n)]


def tiny_model():
    torch.manual_seed(0)
    return HybridLM(ModelConfig.from_preset("tiny"))


def args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), max_steps=12, batch_size=4, learning_rate=3e-3, warmup_steps=2,
                logging_steps=4, eval_steps=6, save_steps=0, show_progress=False)  # fmt: skip
    base.update(kw)
    return TrainArgs(**base)


def test_validation_loss_falls_and_outputs_written(tmp_path):
    trainer = Trainer(tiny_model(), blocks(), blocks(8, seed=0), args(tmp_path, max_steps=20))
    before = trainer.evaluate()
    result = trainer.train()
    vals = [e["val_loss"] for e in result["log"] if "val_loss" in e]
    assert vals[-1] < 0.5 * before and vals[-1] <= vals[0]
    for name in (
        "config.json",
        "model.safetensors",
        "training_args.json",
        "training_log.jsonl",
        "loss_curve.png",
    ):
        assert (tmp_path / name).exists(), name
    assert json.loads((tmp_path / "training_args.json").read_text())["max_steps"] == 20


def test_bf16_on_cpu_learns(tmp_path):
    result = Trainer(tiny_model(), blocks(), blocks(8), args(tmp_path, mixed_precision="bf16")).train()
    losses = [e["loss"] for e in result["log"] if "loss" in e]
    assert losses[-1] < 0.7 * losses[0]


def test_gradient_accumulation_equals_the_larger_batch(tmp_path):
    one = Trainer(tiny_model(), blocks(), [], args(tmp_path / "a", max_steps=2, batch_size=4, eval_steps=0))
    one.train()
    two = Trainer(tiny_model(), blocks(), [], args(tmp_path / "b", max_steps=2, batch_size=2,
                                                  gradient_accumulation_steps=2, eval_steps=0))  # fmt: skip
    two.train()
    for (name, p), q in zip(one.core.named_parameters(), two.core.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4, msg=name)


def test_lr_schedule_warms_up_then_decays():
    a = TrainArgs(output_dir="x", warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, a, 100) == pytest.approx(0.1) and lr_factor(9, a, 100) == pytest.approx(1.0)
    assert lr_factor(100, a, 100) == pytest.approx(0.1)
    assert lr_factor(50, a, 100) < lr_factor(20, a, 100)


def _train_cmd(corpus, tok, out, *extra):
    return [sys.executable, "-m", "mamba_slm", "train", "--dataset", str(corpus), "--tokenizer", str(tok),
            "--preset", "tiny", "--output-dir", str(out), "--block-size", "64", "--batch-size", "4",
            "--max-steps", "24", "--save-steps", "8", "--logging-steps", "4", "--eval-steps", "0",
            "--warmup-steps", "4", "--learning-rate", "3e-3", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def corpus_and_tokenizer(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    (root / "corpus.txt").write_text(TEXT)
    subprocess.run([sys.executable, "-m", "mamba_slm", "tokenizer", "train", "--dataset", str(root / "corpus.txt"),
                    "--vocab-size", "300", "--output-dir", str(root / "tok")], check=True, capture_output=True)  # fmt: skip
    return root / "corpus.txt", root / "tok"


@pytest.mark.slow
def test_resume_after_kill_matches_an_uninterrupted_run(tmp_path, corpus_and_tokenizer):
    corpus, tok = corpus_and_tokenizer
    subprocess.run(_train_cmd(corpus, tok, tmp_path / "full"), check=True, capture_output=True)
    proc = subprocess.Popen(
        _train_cmd(corpus, tok, tmp_path / "killed"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while (
        not (tmp_path / "killed" / "checkpoint-16").exists()
        and proc.poll() is None
        and time.time() < deadline
    ):
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (tmp_path / "killed" / "checkpoint-16").exists() or (tmp_path / "killed" / "checkpoint-8").exists()
    subprocess.run(_train_cmd(corpus, tok, tmp_path / "killed", "--resume"), check=True, capture_output=True)

    def losses(run):
        lines = (tmp_path / run / "training_log.jsonl").read_text().splitlines()
        return {e["step"]: e["loss"] for e in map(json.loads, lines) if "loss" in e}

    full, resumed = losses("full"), losses("killed")
    assert sorted(full) == sorted(resumed) == [4, 8, 12, 16, 20, 24]
    for step in full:
        assert abs(full[step] - resumed[step]) < 1e-4, (step, full[step], resumed[step])
    a, b = HybridLM.from_pretrained(tmp_path / "full"), HybridLM.from_pretrained(tmp_path / "killed")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=name)
    # the corpus table that --prompt-lookup drafts from is written with the model, from the same blocks
    full_table, resumed_table = (CorpusNgrams.load(tmp_path / run / NGRAMS_NAME, a.config.vocab_size)
                                 for run in ("full", "killed"))  # fmt: skip
    assert len(full_table) > 0 and full_table.next_token == resumed_table.next_token


def test_errors(tmp_path, corpus_and_tokenizer):
    corpus, tok = corpus_and_tokenizer
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(TrainError, match="cannot create the output directory"):
        Trainer(tiny_model(), blocks(), [], args(blocker / "out"))
    with pytest.raises(TrainError, match="fewer than one batch"):
        Trainer(tiny_model(), blocks(2), [], args(tmp_path / "few"))
    with pytest.raises(TrainError, match="no checkpoint-N"):
        Trainer(tiny_model(), blocks(), [], args(tmp_path / "none", resume=True)).train()
    Trainer(tiny_model(), blocks(), [], args(tmp_path / "c", max_steps=4, save_steps=2, eval_steps=0)).train()
    (tmp_path / "c" / "checkpoint-4" / "optimizer.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(TrainError, match="checkpoint-4: corrupt checkpoint"):
        Trainer(tiny_model(), blocks(), [], args(tmp_path / "c", max_steps=6, resume=True)).train()
    # a model whose vocabulary is smaller than the tokenizer's
    small = HybridLM(ModelConfig.from_preset("tiny", vocab_size=100))
    small.save_pretrained(tmp_path / "small")
    cmd = _train_cmd(corpus, tok, tmp_path / "mismatch", "--init-from", str(tmp_path / "small"))
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("mamba-slm: error: --tokenizer: 300 tokens")


def _losses(out):
    lines = (out / "training_log.jsonl").read_text().splitlines()
    return [(e["step"], e["loss"]) for e in map(json.loads, lines) if "loss" in e]


def test_resume_from_mid_logging_window_logs_the_uninterrupted_losses(tmp_path):
    full = args(tmp_path / "full", max_steps=12, save_steps=6, eval_steps=0, save_total_limit=3)
    Trainer(tiny_model(), blocks(), [], full).train()
    shutil.copytree(tmp_path / "full", tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "checkpoint-12")  # as if killed after step 6 (log window 4)
    Trainer(tiny_model(), blocks(), [], args(tmp_path / "cut", max_steps=12, save_steps=6, eval_steps=0,
                                              resume=True)).train()  # fmt: skip
    expected, resumed = _losses(tmp_path / "full"), _losses(tmp_path / "cut")
    assert [s for s, _ in resumed] == [s for s, _ in expected] == [4, 8, 12]
    for (_, a), (_, b) in zip(expected, resumed, strict=True):
        assert b == pytest.approx(a, rel=1e-4)


def test_a_fresh_run_never_mixes_with_an_earlier_runs_checkpoints(tmp_path):
    out = tmp_path / "out"
    Trainer(tiny_model(), blocks(), [], args(out, max_steps=4, save_steps=2, eval_steps=0)).train()
    with pytest.raises(TrainError, match="holds checkpoint-4 of an earlier run; pass --resume"):
        Trainer(tiny_model(), blocks(), [], args(out, max_steps=3, save_steps=1, eval_steps=0))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    again = args(out, max_steps=3, save_steps=1, eval_steps=0, overwrite_output_dir=True, logging_steps=1)
    Trainer(tiny_model(), blocks(), [], again).train()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    assert [s for s, _ in _losses(out)] == [1, 2, 3]  # the earlier run's log is gone, not appended to
    early = tmp_path / "early"
    (early / "best").mkdir(parents=True)  # an early-stopping run's best model, without checkpoints
    with pytest.raises(TrainError, match="holds best of an earlier run"):
        Trainer(tiny_model(), blocks(), [], args(early))


def test_resume_refuses_a_changed_data_order_or_model_and_damaged_files(tmp_path):
    out = tmp_path / "c"
    Trainer(tiny_model(), blocks(), [], args(out, max_steps=2, save_steps=2, eval_steps=0)).train()
    with pytest.raises(TrainError, match=r"written with --batch-size 4 \(this run: 2\)"):
        Trainer(tiny_model(), blocks(), [], args(out, batch_size=2, resume=True)).train()
    with pytest.raises(TrainError, match=r"written with 40 training examples \(this run: 30\)"):
        Trainer(tiny_model(), blocks(30), [], args(out, resume=True)).train()  # other data or block size
    other = HybridLM(ModelConfig.from_preset("tiny", d_model=32, head_dim=8))
    with pytest.raises(TrainError, match=r"checkpoint-2: a different model, d_model 64 \(this run: 32\)"):
        Trainer(other, blocks(), [], args(out, resume=True)).train()
    ckpt = out / "checkpoint-2"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    for name, damage in (("rng.pt", b""), ("optimizer.pt", b"")):
        kept = (ckpt / name).read_bytes()
        (ckpt / name).write_bytes(damage)  # a zero-byte file, as a power cut can leave
        with pytest.raises(TrainError, match="checkpoint-2: corrupt checkpoint"):
            Trainer(tiny_model(), blocks(), [], args(out, resume=True)).train()
        (ckpt / name).write_bytes(kept)
    del state["scheduler"]
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    with pytest.raises(
        TrainError, match="corrupt checkpoint \\(trainer_state.json: KeyError: 'scheduler'\\)"
    ):
        Trainer(tiny_model(), blocks(), [], args(out, resume=True)).train()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_agree_on_the_weights(tmp_path, mode):
    worker = os.path.join(os.path.dirname(__file__), "ddp_worker.py")
    port = "29517" if mode == "ddp" else "29518"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        port,
        worker,
        str(tmp_path),
    ]
    cmd += ["fsdp"] if mode == "fsdp" else []
    result = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert result.returncode == 0, result.stderr[-2000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world"] == ranks[1]["world"] == 2
    assert ranks[0]["changed"] and ranks[0]["digest"] == ranks[1]["digest"]
    assert ranks[0]["type"] == "DistributedType.MULTI_CPU"


def test_fsdp_without_accelerators_is_a_clear_error(tmp_path):
    with pytest.raises(TrainError, match="--fsdp: Accelerate shards with FSDP only across several GPUs"):
        Trainer(tiny_model(), blocks(), [], args(tmp_path, fsdp=True))


def test_early_stopping_keeps_the_best_model_and_only_the_last_checkpoints(tmp_path, monkeypatch):
    scripted = iter([3.0, 2.0, 2.5, 2.6, 1.0, 1.0])  # best at the 2nd evaluation, then two worse ones
    snapshots = []

    def fake_evaluate(self):
        snapshots.append({k: v.clone() for k, v in self.core.state_dict().items()})
        return next(scripted)

    monkeypatch.setattr(Trainer, "evaluate", fake_evaluate)
    run = args(
        tmp_path, max_steps=40, eval_steps=2, early_stopping_patience=2, save_steps=2, save_total_limit=2
    )
    result = Trainer(tiny_model(), blocks(), blocks(8), run).train()
    assert result["step"] == 8 and len(snapshots) == 4  # stopped after two evaluations without improvement
    assert result["best_val_loss"] == 2.0
    best = HybridLM.from_pretrained(tmp_path / "best").state_dict()
    for key, value in snapshots[1].items():
        assert torch.equal(best[key], value), key
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-6", "checkpoint-8"]
    assert not list(tmp_path.glob(".tmp-*"))


@pytest.mark.slow
def test_compiled_model_trains(tmp_path):
    result = Trainer(
        tiny_model(), blocks(), [], args(tmp_path, max_steps=3, compile=True, eval_steps=0)
    ).train()
    assert result["step"] == 3 and all(math.isfinite(e["loss"]) for e in result["log"] if "loss" in e)


def test_lookup_tokens_0_trains_without_a_lookup_table(tmp_path, corpus_and_tokenizer):
    corpus, tok = corpus_and_tokenizer
    cmd = _train_cmd(corpus, tok, tmp_path / "run", "--max-steps", "2", "--lookup-tokens", "0")
    subprocess.run(cmd, check=True, capture_output=True)
    assert (tmp_path / "run" / "model.safetensors").exists()
    assert not (tmp_path / "run" / NGRAMS_NAME).exists()


def test_bad_arguments_are_one_line_errors(tmp_path, corpus_and_tokenizer):
    with pytest.raises(TrainError, match="--batch-size: expected a positive integer, got 0"):
        args(tmp_path, batch_size=0)
    with pytest.raises(TrainError, match="--max-steps"):
        args(tmp_path, max_steps=-1)
    corpus, tok = corpus_and_tokenizer
    for extra, message in [(["--batch-size", "0"], "--batch-size"), (["--block-size", "1"], "--block-size"),
                           (["--preset", "huge"], "unknown preset"), (["--lookup-tokens", "-1"], "--lookup-tokens")]:  # fmt: skip
        cmd = _train_cmd(corpus, tok, tmp_path / "bad", *extra)
        result = subprocess.run(cmd, capture_output=True, text=True)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert message in result.stderr.strip().splitlines()[-1]
