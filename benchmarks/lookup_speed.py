"""Prompt-lookup decoding against plain greedy and transformers' `generate`, in one run.

    python benchmarks/lookup_speed.py [--write docs/benchmarks.md] [--trained DIR ...]

Batch 1 greedy, 128 new tokens after each of the seed's five prompts; tokens/s of whole generate
calls (prefill included), best of interleaved rounds (the generators in turn, forward then
backward), and each ratio to `generate` also as the median of the rounds' own ratios, both sides
timed within seconds of each other on this drifting VM. Models:
  * the ~30M benchmark model of generation_speed.py with random weights: no text of its own that
    it repeats, so drafts almost never match;
  * the same configuration trained on the built-in corpus (`runs/bench-30m`, trained on first use:
    an 8,192-token tokenizer, then 220 steps of 8 x 256 tokens, ~6 minutes on 2 cores);
  * `make demo`'s model, when it is there;
  * any other `--trained` directory.
Trained small models' greedy text repeats itself, which is what lookup drafts from. For each: our
engine plain; our engine with `prompt_lookup=LOOKUP`, drafting from the context only, then also
from the model directory's n-gram table where the context has no match (`lookup_ngrams.safetensors`:
the model's own greedy predictions after each 1-2 token context of some of its training text, which
`train` writes; counted here with `mamba-slm ngrams` on the built-in corpus for a model
directory without one); and our model through transformers' `generate` on the same weights
(transformers refuses prompt lookup and assisted decoding for stateful models, so its run is plain
greedy). "Tokens per pass" is the new tokens over the model passes after the prefill. Lookup's
tokens are checked to equal plain greedy's. For the trained models, sampling too: the model's own
CLI's default settings (temperature 0.8, top-p 0.9) and plain temperature 1, seeded, plain
against prompt lookup with the table; lookup's samples are checked to equal plain sampling's for the same seed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from mamba_slm.bench import SEED_PROMPTS, paired_ratio, random_prompt  # noqa: E402
from mamba_slm.generation import Engine, GenerationConfig, load_engine  # noqa: E402
from mamba_slm.hf import MambaSLMForCausalLM  # noqa: E402
from mamba_slm.runtime import tune_cpu_allocator  # noqa: E402
from mamba_slm.speculative import FIRST_DRAFT, KEPT_MIN, NGRAMS_NAME  # noqa: E402
from model_speed import build, write_section  # noqa: E402

NEW_TOKENS = 128
LOOKUP = 15  # the longest draft: a pass of 16 tokens, the most the one-call C step takes
BENCH_MODEL = Path("runs/bench-30m")
TRAIN_STEPS = 220
SAMPLING = [(0.8, 0.9), (1.0, 1.0)]  # temperature, top-p: the CLI's defaults; plain sampling


def train_bench_model(out: Path) -> None:
    """The benchmark configuration trained on the built-in corpus, through the CLI."""
    c = build("ours").config
    cli = [sys.executable, "-m", "mamba_slm"]
    subprocess.run([*cli, "tokenizer", "train", "--dataset", "shakespeare", "--vocab-size", str(c.vocab_size),
                    "--output-dir", str(out / "tokenizer")], check=True)  # fmt: skip
    subprocess.run([*cli, "train", "--dataset", "shakespeare", "--tokenizer", str(out / "tokenizer"),
                    "--output-dir", str(out / "model"), "--d-model", str(c.d_model),
                    "--layer-pattern", c.layer_pattern, "--d-state", str(c.d_state), "--head-dim", str(c.head_dim),
                    "--n-heads", str(c.n_heads), "--n-kv-heads", str(c.n_kv_heads),
                    "--d-intermediate", str(c.d_intermediate), "--chunk-size", str(c.chunk_size),
                    "--block-size", "256", "--batch-size", "8", "--max-steps", str(TRAIN_STEPS),
                    "--learning-rate", "1e-3", "--warmup-steps", "20", "--logging-steps", "20",
                    "--eval-steps", "1000", "--save-steps", "1000"], check=True)  # fmt: skip


def measure(engine: Engine, prompts: list[list[int]], rounds: int) -> dict:
    """Best tokens/s of each generator over interleaved rounds, each one's paired ratios to
    `generate` (`{name}_vs_hf`), and each lookup's tokens per pass."""
    plain, lookup = (
        GenerationConfig(max_new_tokens=NEW_TOKENS, temperature=0, prompt_lookup=k) for k in (0, LOOKUP)
    )
    hf = MambaSLMForCausalLM.from_core(engine.model).eval()
    table = engine.ngrams

    def hf_generate(p):
        with torch.inference_mode():
            hf.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                        pad_token_id=0, eos_token_id=None)  # fmt: skip

    def lookup_with(ngrams):
        def run(p):
            engine.ngrams = ngrams
            return engine.generate([p], lookup)

        return run

    runners = {"plain": lambda p: engine.generate([p], plain), "lookup": lookup_with(None)}
    if table is not None:
        runners["corpus"] = lookup_with(table)
    runners["hf"] = hf_generate
    passes: list[int] = []  # model passes (prefill included) of the latest generate call
    hook = engine.model.register_forward_hook(lambda m, args, out: passes.append(1))
    decode_passes = dict.fromkeys(("lookup", "corpus") if table is not None else ("lookup",), 0)
    for p in prompts:
        want = engine.generate([p], plain)[0].tokens
        for name in decode_passes:
            passes.clear()
            assert runners[name](p)[0].tokens == want, "prompt lookup changed the greedy tokens"
            decode_passes[name] += len(passes) - 1
    hook.remove()
    speeds: dict[str, list[float]] = {name: [] for name in runners}  # tokens/s, round by round
    for i in range(rounds):
        for name in list(runners) if i % 2 == 0 else list(runners)[::-1]:
            seconds = 0.0
            for p in prompts:
                start = time.perf_counter()
                runners[name](p)
                seconds += time.perf_counter() - start
            speeds[name].append(len(prompts) * NEW_TOKENS / seconds)
    engine.ngrams = table
    best: dict = {name: max(s) for name, s in speeds.items()}
    for name in decode_passes:
        best[f"{name}_vs_hf"] = paired_ratio(speeds[name], speeds["hf"])
    for name, n in decode_passes.items():
        best[f"{name}_tokens_per_pass"] = len(prompts) * NEW_TOKENS / n
    return best


def measure_sampled(
    engine: Engine, prompts: list[list[int]], rounds: int, temperature: float, top_p: float
) -> dict:
    """Plain sampling against sampling with prompt lookup, seeded: best tokens/s of each, the
    median of the rounds' ratios, lookup's tokens per pass."""
    plain = GenerationConfig(max_new_tokens=NEW_TOKENS, temperature=temperature, top_p=top_p, seed=0)
    lookup = GenerationConfig(
        max_new_tokens=NEW_TOKENS, temperature=temperature, top_p=top_p, seed=0, prompt_lookup=LOOKUP
    )
    calls: list[int] = []  # lookup's model passes, prefills included
    for p in prompts:
        want = engine.generate([p], plain)[0].tokens
        hook = engine.model.register_forward_hook(lambda m, args, out: calls.append(1))
        assert engine.generate([p], lookup)[0].tokens == want, "prompt lookup changed the samples"
        hook.remove()
    decode_passes = len(calls) - len(prompts)
    speeds: dict[str, list[float]] = {"plain": [], "lookup": []}
    for i in range(rounds):
        for name, config in [("plain", plain), ("lookup", lookup)][:: 1 if i % 2 == 0 else -1]:
            start = time.perf_counter()
            for p in prompts:
                engine.generate([p], config)
            speeds[name].append(len(prompts) * NEW_TOKENS / (time.perf_counter() - start))
    return {"temperature": plain.temperature, "top_p": plain.top_p, "plain": max(speeds["plain"]),
            "lookup": max(speeds["lookup"]), "ratio": paired_ratio(speeds["lookup"], speeds["plain"]),
            "tokens_per_pass": len(prompts) * NEW_TOKENS / decode_passes}  # fmt: skip


def row(label: str, r: dict) -> str:
    def drafted(name: str) -> str:
        if name not in r:
            return "— | —"
        pass_cost = r["plain"] * r[f"{name}_tokens_per_pass"] / r[name]
        paired = r[f"{name}_vs_hf"]
        return (f"{r[name]:.0f} ({r[f'{name}_tokens_per_pass']:.2f} tokens per pass, a pass {pass_cost:.2f} plain "
                f"steps) | **{paired['median']:.2f}x** ({paired['q1']:.2f}-{paired['q3']:.2f}); "
                f"{r[name] / r['hf']:.2f}x")  # fmt: skip

    return f"| {label} | {r['plain']:.0f} | {r['hf']:.0f} | {drafted('lookup')} | {drafted('corpus')} |"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--write", type=Path, help="update this markdown file's section")
    parser.add_argument(
        "--trained", type=Path, action="append", default=[], help="another trained model directory"
    )
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    if not (BENCH_MODEL / "model" / "config.json").exists():
        train_bench_model(BENCH_MODEL)
    tune_cpu_allocator()
    torch.manual_seed(0)
    random_engine = Engine(build("ours").eval())
    random_prompts = [random_prompt(random_engine, 8, seed=i)[0] for i in range(len(SEED_PROMPTS))]
    lines = [row("~30M benchmark model, random weights", measure(random_engine, random_prompts, args.rounds))]
    sampled_lines = []
    demo = Path("runs/demo/model")
    for path in [BENCH_MODEL / "model", *([demo] if (demo / "config.json").exists() else []), *args.trained]:
        if not (path / NGRAMS_NAME).exists():  # trained before `train` wrote the table: the built-in corpus's
            subprocess.run([sys.executable, "-m", "mamba_slm", "ngrams", "--model", str(path)], check=True)
        engine = load_engine(str(path))
        steps = json.loads((path / "training_args.json").read_text()).get("max_steps")
        label = f"`{path}`: {engine.model.num_parameters() / 1e6:.1f}M parameters, trained {steps} steps"
        lines.append(row(label, measure(engine, engine.encode(SEED_PROMPTS), args.rounds)))
        for temperature, top_p in SAMPLING:
            r = measure_sampled(engine, engine.encode(SEED_PROMPTS), args.rounds, temperature, top_p)
            sampled_lines.append(
                f"| {label} | {temperature:g} / {top_p:g} | {r['plain']:.0f} | {r['lookup']:.0f} "
                f"({r['tokens_per_pass']:.2f} tokens per pass) | **{r['ratio']['median']:.2f}x** "
                f"({r['ratio']['q1']:.2f}-{r['ratio']['q3']:.2f}) |"
            )
    body = "\n".join([
        f"Machine: {os.cpu_count()} cores, {torch.get_num_threads()} threads, torch {torch.__version__}; fp32, batch 1 "
        f"greedy, {NEW_TOKENS} new tokens after each of the seed's 5 prompts, best of {args.rounds} interleaved "
        f"rounds; prompt lookup drafts up to {LOOKUP} tokens per pass (from {FIRST_DRAFT}, doubled after a draft "
        f"accepted whole) and gave plain greedy's tokens (checked). "
        f"`{BENCH_MODEL}/model` is the ~30M benchmark configuration trained on the built-in corpus by this script.",
        "",
        "| model | Engine tok/s | ours through transformers `generate` tok/s | Engine + prompt lookup, context "
        "drafts only, tok/s | vs `generate`: median of the rounds' ratios (quartiles); ratio of the best rounds "
        "| + table drafts (the model's predictions) where the context has no match, tok/s "
        "| vs `generate`, the same |",
        "|---|---|---|---|---|---|---|",
        *lines,
        "",
        "Random weights almost never repeat a span of their own text, so lookup is plain greedy plus the cost of "
        "the few rejected drafts (and they have no table); trained small models' greedy text repeats itself, and "
        "keeps to its corpus's common phrases. \"A pass, in plain steps\" is what a lookup pass (the last token "
        "and its draft, verified together) costs in plain greedy's time per token.",
        "",
        f"Sampling, seed 0, {NEW_TOKENS} new tokens after each prompt, at generate's and chat's default settings "
        "and at plain temperature 1: plain against prompt lookup with the table; lookup drew the same samples "
        "(checked). Sampled drafts start at 1 token, and a source whose drafts' first tokens are kept less than "
        f"{KEPT_MIN:.0%} of the time pauses (speculative.py).",
        "",
        "| model | temperature / top-p | Engine sampling tok/s | + prompt lookup tok/s | lookup vs plain: median "
        "of the rounds' ratios (quartiles) |",
        "|---|---|---|---|---|",
        *sampled_lines,
        "",
    ])  # fmt: skip
    print(body)
    if args.write:
        write_section(args.write, "Prompt-lookup decoding", "make bench (benchmarks/lookup_speed.py)", body)


if __name__ == "__main__":
    main()
