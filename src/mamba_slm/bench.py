"""Generation speed of a model: what `mamba-slm bench` measures and `benchmarks/` reuses.

  * the seed's benchmark: five prompts, 100 new tokens each (greedy, no early stop), tokens/s of
    each generate call (prefill included), average and peak;
  * prefill tokens/s and time to first token for a 512-token prompt;
  * per-token decode latency at context positions (128, 1k, 4k by default): flat for the Mamba
    layers, growing only with the attention layers' KV reads;
  * decode throughput at batch 1/4/16 (new tokens per second of decode, prefill excluded);
  * peak memory (process max RSS on CPU, max allocated on CUDA);
  * with `compare_hf`, transformers' `generate` on the same weights (through `hf.py`), same
    prompts, and the ratio.
Timings take the best of a few repeats: on a shared CPU the minimum is the stable statistic.
"""

from __future__ import annotations

import resource
import time
from dataclasses import asdict, dataclass

import torch

from .generation import Engine, GenerationConfig

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
    decode_steps: int = 32  # steps timed per latency / throughput measurement
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


def decode_seconds_per_step(engine: Engine, prompts: list[list[int]], steps: int, repeats: int) -> float:
    """Seconds per decode step after prefilling `prompts` (the engine's own step loop, prefill excluded)."""

    def run() -> float:
        it = engine._steps(prompts, greedy(steps + 1))
        next(it)  # prefill + first token
        _sync(engine.device)
        start = time.perf_counter()
        for _ in it:
            pass
        _sync(engine.device)
        return (time.perf_counter() - start) / steps

    with torch.inference_mode():
        run()
        return min(run() for _ in range(repeats))


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
    report["latency_ms"] = {
        str(pos): 1000 * decode_seconds_per_step(engine, random_prompt(engine, pos), args.decode_steps, args.repeats)
        for pos in args.positions
    }  # fmt: skip
    report["decode_tokens_per_s"] = {
        str(b): b / decode_seconds_per_step(engine, random_prompt(engine, 32, b), args.decode_steps, args.repeats)
        for b in args.batch_sizes
    }  # fmt: skip
    if args.compare_hf:
        hf = hf_seed_benchmark(engine, args)
        hf["speedup"] = report["seed_benchmark"]["average_tokens_per_s"] / hf["average_tokens_per_s"]
        report["transformers_generate"] = hf
    report["peak_memory_mb"] = peak_memory_mb(engine.device)
    return report


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
    lines.append(latency)
    lines.append("Decode throughput: " + ", ".join(f"batch {k} {v:.0f} tok/s"
                                                   for k, v in r["decode_tokens_per_s"].items()))  # fmt: skip
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
