"""Prompt-lookup decoding against plain greedy and transformers' `generate`, in one run.

    python benchmarks/lookup_speed.py [--write docs/benchmarks.md] [--trained runs/demo/model]

Batch 1 greedy, 128 new tokens, the seed's five prompts; tokens/s of whole generate calls (prefill
included), best of interleaved rounds. Two models:
  * the ~30M benchmark model of generation_speed.py, random weights (no trained text to repeat);
  * a trained model (`make demo`'s, when it is there): its greedy text repeats itself, as small
    models' greedy text does.
For each: our engine plain, our engine with `prompt_lookup=4`, and our model through transformers'
`generate` (which refuses prompt lookup and assisted decoding for stateful models), the same
weights. "Tokens per pass" is new tokens over the model passes after the prefill; the lookup's
tokens are checked to equal plain greedy's.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from mamba_slm.bench import SEED_PROMPTS, random_prompt  # noqa: E402
from mamba_slm.generation import Engine, GenerationConfig, load_engine  # noqa: E402
from mamba_slm.hf import MambaSLMForCausalLM  # noqa: E402
from mamba_slm.runtime import tune_cpu_allocator  # noqa: E402
from model_speed import build, write_section  # noqa: E402

NEW_TOKENS = 128
LOOKUP = 4


def measure(engine: Engine, prompts: list[list[int]], rounds: int) -> dict[str, float]:
    """Best tokens/s of each generator over interleaved rounds, and the lookup's tokens per pass."""
    plain, lookup = (
        GenerationConfig(max_new_tokens=NEW_TOKENS, temperature=0, prompt_lookup=k) for k in (0, LOOKUP)
    )
    hf = MambaSLMForCausalLM.from_core(engine.model).eval()

    def hf_generate(p):
        with torch.inference_mode():
            hf.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                        pad_token_id=0, eos_token_id=None)  # fmt: skip

    runners = {
        "plain": lambda p: engine.generate([p], plain),
        "lookup": lambda p: engine.generate([p], lookup),
        "hf": hf_generate,
    }
    passes: list[int] = []  # model passes (prefill included) of the latest generate call
    hook = engine.model.register_forward_hook(lambda m, args, out: passes.append(1))
    decode_passes = 0
    for p in prompts:
        want = engine.generate([p], plain)[0].tokens
        passes.clear()
        assert engine.generate([p], lookup)[0].tokens == want, "prompt lookup changed the greedy tokens"
        decode_passes += len(passes) - 1
    hook.remove()
    best: dict[str, float] = {}
    for _ in range(rounds):
        for name, run in runners.items():
            seconds = 0.0
            for p in prompts:
                start = time.perf_counter()
                run(p)
                seconds += time.perf_counter() - start
            best[name] = max(best.get(name, 0.0), len(prompts) * NEW_TOKENS / seconds)
    best["tokens_per_pass"] = len(prompts) * NEW_TOKENS / decode_passes
    return best


def rows(label: str, r: dict[str, float]) -> list[str]:
    return [
        f"| {label} | {r['plain']:.0f} | {r['lookup']:.0f} ({r['tokens_per_pass']:.2f} tokens per pass) | "
        f"{r['hf']:.0f} | {r['lookup'] / r['plain']:.2f}x | {r['lookup'] / r['hf']:.2f}x |"
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--write", type=Path, help="update this markdown file's section")
    parser.add_argument(
        "--trained", type=Path, default=Path("runs/demo/model"), help="a trained model directory"
    )
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    tune_cpu_allocator()
    torch.manual_seed(0)
    random_engine = Engine(build("ours").eval())
    results = {"random": measure(random_engine, [random_prompt(random_engine, 8, seed=i)[0] for i in range(5)],
                                 args.rounds)}  # fmt: skip
    trained = None
    if (args.trained / "config.json").exists():
        trained = load_engine(str(args.trained))
        results["trained"] = measure(trained, trained.encode(SEED_PROMPTS), args.rounds)
    header = [
        f"Machine: {os.cpu_count()} cores, {torch.get_num_threads()} threads, torch {torch.__version__}; fp32, batch 1 "
        f"greedy, {NEW_TOKENS} new tokens, the seed's 5 prompts, best of {args.rounds} interleaved rounds; "
        f"prompt lookup drafts up to {LOOKUP} tokens per pass and gives plain greedy's tokens (checked).",
        "",
        "| model | Engine tok/s | Engine + prompt lookup tok/s | ours through transformers `generate` tok/s "
        "| lookup vs plain | lookup vs `generate` |",
        "|---|---|---|---|---|---|",
    ]  # fmt: skip
    body = header + rows("~30M benchmark model, random weights", results["random"])
    if trained is not None:
        n = trained.model.num_parameters()
        body += rows(
            f"`{args.trained}` ({n / 1e6:.1f}M parameters, trained by `make demo`)", results["trained"]
        )
    else:
        body.append(f"| (no trained model at `{args.trained}`: run `make demo` first) | | | | | |")
    body += [
        "",
        "Random weights rarely repeat a span of their own text, so few drafts are accepted and lookup is "
        "plain greedy plus the cost of the rejected drafts; a trained small model's greedy text repeats itself.",
        "",
    ]
    text = "\n".join(body)
    print(text)
    if args.write:
        write_section(args.write, "Prompt-lookup decoding", "make bench (benchmarks/lookup_speed.py)", text)


if __name__ == "__main__":
    main()
