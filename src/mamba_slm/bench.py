"""Generation speed of a model: what `mamba-slm bench` measures and `benchmarks/` reuses.

  * the seed's benchmark: five prompts, 100 new tokens each (greedy, no early stop), tokens/s of
    each generate call (prefill included), average and peak;
  * prefill tokens/s and time to first token for a 512-token prompt;
  * per-token decode latency at context positions (128, 1k, 4k by default): flat for the Mamba
    layers, growing only with the attention layers' KV reads;
  * decode throughput at batch 1/4/16 (new tokens per second of decode, prefill excluded);
  * how the latency grows with the context, and the throughput with the batch, as ratios to the
    first position / batch size, measured paired (below);
  * peak memory (process max RSS on CPU, max allocated on CUDA);
  * with `compare_hf`, transformers' `generate` on the same weights (through `hf.py`), same
    prompts, and the ratio.
Timings take the best of a few repeats: on a shared CPU the minimum is the stable statistic.
Ratios are not taken between two minima, which may come from different minutes of a machine
whose speed drifts (this 2-core VM's memory bandwidth swings 37-79 GB/s from minute to minute):
the decodes being compared run side by side, their timed blocks of steps taken in turn, and the
ratio is the median of the block-by-block ratios (`interleaved_step_seconds`, `paired_ratio`).
"""

from __future__ import annotations

import resource
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from .generation import GREEDY_CHUNK, Engine, GenerationConfig

SEED_PROMPTS = [
    "The future of artificial intelligence",
    "In the field of machine learning",
    "Python programming language is",
    "Deep learning models can",
    "Natural language processing enables",
]


@dataclass
class BenchArgs:
    max_new_tokens: int = 100
    positions: tuple[int, ...] = (128, 1024, 4096)
    batch_sizes: tuple[int, ...] = (1, 4, 16)
    decode_blocks: int = 8  # timed blocks per latency / throughput measurement, taken in turn
    block_steps: int = GREEDY_CHUNK  # decode steps per timed block: one call of greedy's C steps
    prefill_tokens: int = 512
    repeats: int = 2
    compare_hf: bool = False
    prompt_lookup: int = 0  # the seed benchmark's draft tokens per pass (speculative.py); 0 = plain greedy


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_of(fn, repeats: int, device: torch.device) -> float:
    """The fastest of `repeats` timed calls (after one warm-up call), in seconds."""
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


def greedy(max_new_tokens: int, prompt_lookup: int = 0) -> GenerationConfig:
    # no stop ids: always full length
    return GenerationConfig(max_new_tokens=max_new_tokens, temperature=0, prompt_lookup=prompt_lookup)


def random_prompt(engine: Engine, length: int, batch: int = 1, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, engine.model.config.vocab_size, (batch, length), generator=g).tolist()


def seed_prompts(engine: Engine) -> list[list[int]]:
    if engine.tokenizer is not None:
        return engine.encode(SEED_PROMPTS)
    return [random_prompt(engine, 8, seed=i)[0] for i in range(len(SEED_PROMPTS))]


def seed_benchmark(engine: Engine, args: BenchArgs) -> dict:
    runs = []
    config = greedy(args.max_new_tokens, args.prompt_lookup)
    for text, ids in zip(SEED_PROMPTS, seed_prompts(engine), strict=True):
        seconds = best_of(lambda ids=ids: engine.generate([ids], config), args.repeats, engine.device)
        runs.append({"prompt": text, "seconds": seconds, "tokens": args.max_new_tokens,
                     "tokens_per_s": args.max_new_tokens / seconds})  # fmt: skip
    speeds = [r["tokens_per_s"] for r in runs]
    return {"runs": runs, "average_tokens_per_s": sum(speeds) / len(speeds), "peak_tokens_per_s": max(speeds)}


def interleaved_step_seconds(
    engine: Engine, prompt_sets: list[list[list[int]]], blocks: int, steps: int
) -> list[list[float]]:
    """Seconds per decode step, per prompt set and block: every set is prefilled and decodes
    greedily, one block of `steps` steps at a time, the sets taken in turn (forward, then backward,
    so no set always runs first). Block i of every set thus ran within the same fraction of a
    second, which is what `paired_ratio` compares. Prefill and a first block are not timed. Greedy
    decoding runs GREEDY_CHUNK steps per call of the C kernels where they cover the model: with
    `steps` a multiple of it, every block holds whole calls."""
    with torch.inference_mode():
        runs = [engine._steps(prompts, greedy((blocks + 1) * steps + 1)) for prompts in prompt_sets]
        try:
            for run in runs:
                next(run)  # prefill + first token
                for _ in range(steps):  # a first block: lazily built state (the C step's plan) is not timed
                    next(run)
            seconds: list[list[float]] = [[] for _ in prompt_sets]
            order = list(range(len(runs)))
            for block in range(blocks):
                for i in order if block % 2 == 0 else order[::-1]:
                    _sync(engine.device)
                    start = time.perf_counter()
                    for _ in range(steps):
                        next(runs[i])
                    _sync(engine.device)
                    seconds[i].append((time.perf_counter() - start) / steps)
        finally:
            for run in runs:
                run.close()
    return seconds


def paired_ratio(numerator: list[float], denominator: list[float]) -> dict:
    """The median, and the quartiles, of numerator[i] / denominator[i] over paired blocks."""
    ratios = sorted(n / d for n, d in zip(numerator, denominator, strict=True))
    if len(ratios) < 2:
        return {"median": ratios[0], "q1": ratios[0], "q3": ratios[0], "blocks": len(ratios)}
    q1, median, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return {"median": median, "q1": q1, "q3": q3, "blocks": len(ratios)}


def decode_figures(engine: Engine, args: BenchArgs) -> dict:
    """Per-token latency (ms) per context position, decode tokens/s per batch size (the fastest
    block of each), and the paired ratios: each position's latency over the first position's, each
    batch size's throughput over the first batch size's."""
    positions = interleaved_step_seconds(
        engine, [random_prompt(engine, pos) for pos in args.positions], args.decode_blocks, args.block_steps
    )
    batches = interleaved_step_seconds(
        engine, [random_prompt(engine, 32, b) for b in args.batch_sizes], args.decode_blocks, args.block_steps
    )
    first_b = args.batch_sizes[0]
    return {
        "latency_ms": {str(p): 1000 * min(s) for p, s in zip(args.positions, positions, strict=True)},
        "latency_ratio": {str(p): paired_ratio(s, positions[0]) for p, s in zip(args.positions, positions, strict=True)},
        "decode_tokens_per_s": {str(b): b / min(s) for b, s in zip(args.batch_sizes, batches, strict=True)},
        "throughput_ratio": {
            # tokens/s of batch b over batch first_b's: b / s_b over first_b / s_first
            str(b): paired_ratio([b * t for t in batches[0]], [first_b * t for t in s])
            for b, s in zip(args.batch_sizes, batches, strict=True)
        },
    }  # fmt: skip


def prefill(engine: Engine, args: BenchArgs) -> dict:
    prompt = random_prompt(engine, args.prefill_tokens)
    with torch.inference_mode():
        first = best_of(lambda: engine.generate(prompt, greedy(1)), args.repeats, engine.device)
    return {"tokens": args.prefill_tokens, "tokens_per_s": args.prefill_tokens / first,
            "time_to_first_token_ms": 1000 * first}  # fmt: skip


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def hf_seed_benchmark(engine: Engine, args: BenchArgs) -> dict:
    """transformers' generate on the same weights (our model through hf.py), the same prompts."""
    from .hf import MambaSLMForCausalLM

    hf = MambaSLMForCausalLM.from_core(engine.model).eval()
    speeds = []
    for ids in seed_prompts(engine):
        inputs = torch.tensor([ids], device=engine.device)

        def run(inputs=inputs):
            with torch.inference_mode():
                hf.generate(inputs, max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens,
                            do_sample=False, pad_token_id=engine.pad_id, eos_token_id=None)  # fmt: skip

        speeds.append(args.max_new_tokens / best_of(run, args.repeats, engine.device))
    return {"average_tokens_per_s": sum(speeds) / len(speeds), "peak_tokens_per_s": max(speeds)}


def run_bench(engine: Engine, args: BenchArgs) -> dict:
    model = engine.model
    report: dict = {"device": str(engine.device), "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                    "threads": torch.get_num_threads(),
                    "parameters": model.num_parameters(), "context_length": model.config.max_position_embeddings,
                    "settings": asdict(args)}  # fmt: skip
    report["seed_benchmark"] = seed_benchmark(engine, args)
    report["prefill"] = prefill(engine, args)
    report.update(decode_figures(engine, args))
    if args.compare_hf:
        hf = hf_seed_benchmark(engine, args)
        hf["speedup"] = report["seed_benchmark"]["average_tokens_per_s"] / hf["average_tokens_per_s"]
        report["transformers_generate"] = hf
    report["peak_memory_mb"] = peak_memory_mb(engine.device)
    return report


def _ratios_text(ratios: dict, unit: str, what: str) -> str:
    keys = list(ratios)
    if len(keys) < 2:
        return ""
    parts = [
        f"{unit} {k} {ratios[k]['median']:.2f}x ({ratios[k]['q1']:.2f}-{ratios[k]['q3']:.2f})"
        for k in keys[1:]
    ]
    return (f"\n  {what} vs {unit} {keys[0]}, median of {ratios[keys[0]]['blocks']} paired blocks "
            f"(quartiles): " + ", ".join(parts))  # fmt: skip


def format_report(r: dict) -> str:
    lines = ["=" * 60, "Performance Benchmark", "=" * 60, ""]
    runs = r["seed_benchmark"]["runs"]
    for i, run in enumerate(runs, 1):
        lines += [f"Test {i}/{len(runs)}: {run['prompt']}...",
                  f"  Time: {run['seconds']:.2f}s, Tokens: {run['tokens']}, Speed: {run['tokens_per_s']:.1f} tok/s", ""]  # fmt: skip
    sb = r["seed_benchmark"]
    lookup = r["settings"]["prompt_lookup"]
    if lookup:
        lines += [f"(greedy with prompt lookup: up to {lookup} drafted tokens per pass)", ""]
    lines += ["=" * 60, f"Average Performance: {sb['average_tokens_per_s']:.1f} tokens/second",
              f"Peak Speed: {sb['peak_tokens_per_s']:.1f} tokens/second",
              f"Total time: {sum(run['seconds'] for run in runs):.2f}s",
              f"Total tokens: {sum(run['tokens'] for run in runs)}", "=" * 60, ""]  # fmt: skip
    p = r["prefill"]
    lines.append(f"Prefill ({p['tokens']} tokens): {p['tokens_per_s']:.0f} tok/s, "
                 f"time to first token {p['time_to_first_token_ms']:.1f} ms")  # fmt: skip
    latency = "Per-token latency: " + ", ".join(f"{k} ctx {v:.2f} ms" for k, v in r["latency_ms"].items())
    beyond = [k for k in r["latency_ms"] if int(k) > r["context_length"]]
    if beyond:  # measurable (nothing stops decoding there), but past what the model was trained on
        latency += f" ({', '.join(beyond)}: beyond the model's {r['context_length']}-token context)"
    lines.append(latency + _ratios_text(r["latency_ratio"], "ctx", "latency"))
    lines.append("Decode throughput: " + ", ".join(f"batch {k} {v:.0f} tok/s" for k, v in r["decode_tokens_per_s"].items())
                 + _ratios_text(r["throughput_ratio"], "batch", "throughput"))  # fmt: skip
    if "transformers_generate" in r:
        hf = r["transformers_generate"]
        lines.append(f"transformers generate (same weights): {hf['average_tokens_per_s']:.1f} tok/s; "
                     f"ours is {hf['speedup']:.2f}x")  # fmt: skip
        if lookup:
            lines.append(
                "  (transformers refuses prompt lookup for stateful models: its run is plain greedy)"
            )
    lines.append(f"Peak memory: {r['peak_memory_mb']:.0f} MB ({r['device']}, {r['dtype']}, {r['threads']} threads, "
                 f"{r['parameters']:,} parameters)")  # fmt: skip
    return "\n".join(lines)
