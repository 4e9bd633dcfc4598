"""Generation speed: our engine against transformers' `generate`, in one run, same weights.

    python benchmarks/generation_speed.py [--write docs/benchmarks.md] [--new-tokens 128]

Models: the ~30M benchmark size of benchmarks/model_speed.py (vocab 8192, d_model 512, 8 layers,
2 of them attention for the hybrid). Measured, fp32, batch 1 greedy, 128 new tokens after an
8-token prompt (prefill included, as the seed's benchmark counts it):
  * our `Engine`;
  * our model through transformers' `generate` (`hf.py`, the very same weights);
  * HF `LlamaForCausalLM` `generate` at the same size;
  * HF `Mamba2ForCausalLM` `generate` at the same size (a pure state-space peer);
and, for our engine, per-token latency at context positions 128 / 1k / 4k (also with a bf16 KV
cache), decode throughput at batch 1 / 4 / 16, and the memory-bandwidth bound of batch-1 decode
(weight bytes read per token over this machine's measured read bandwidth). The same weights
rounded to bf16 (`--dtype bfloat16`: the C step reads them as stored, sums in fp32) get a row of
their own, with their own bound. Rounds are interleaved and the best round kept. The decode-only
figures run side by side in timed blocks taken in turn (`mamba_slm.bench.interleaved_step_seconds`):
latencies and throughputs are the fastest block's, and the 4k-vs-128 and batch-16-vs-1 ratios
the median of the block-by-block ratios, so that both sides of a ratio come from the same moment
of this VM, whose speed drifts from minute to minute.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from mamba_slm.bench import interleaved_step_seconds, paired_ratio, random_prompt  # noqa: E402
from mamba_slm.generation import GREEDY_CHUNK, Engine, GenerationConfig  # noqa: E402
from mamba_slm.hf import MambaSLMForCausalLM  # noqa: E402
from mamba_slm.runtime import tune_cpu_allocator  # noqa: E402
from model_speed import build, max_rss_mb, write_section  # noqa: E402

PROMPTS = 5


def read_bandwidth_gbs(mb: int = 512) -> float:
    """Median of 7 full reads (a sum) of a random buffer far larger than the caches."""
    x = torch.rand(mb * 2**20 // 4)
    x.sum()
    times = sorted(_timed(x.sum) for _ in range(7))
    return x.numel() * 4 / times[3] / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def weight_bytes_per_token(model) -> int:
    """Bytes of the weights a decode step reads: everything but the embedding table (one row is
    read), unless the table is also the (tied) LM head."""
    params = {id(p): p for p in model.parameters()}
    total = sum(p.numel() * p.element_size() for p in params.values())
    embed = model.embed_tokens.weight
    tied = model.lm_head.weight is embed
    return total if tied else total - embed.numel() * embed.element_size()


def kv_bytes_per_token(model, context: int) -> int:
    """Bytes of cached keys and values one decode step reads at this context (fp32 cache)."""
    c = model.config
    return c.layer_pattern.count("A") * 2 * c.n_kv_heads * c.attn_head_dim * context * 4


def _ratio(r: dict) -> str:
    return f"**{r['median']:.2f}x** ({r['q1']:.2f}-{r['q3']:.2f})"


def greedy_tok_s(generate_fn, prompts: list[list[int]], new_tokens: int) -> float:
    """Average tokens/s over the prompts (each call: prefill + new_tokens greedy steps)."""
    return sum(new_tokens / _timed(lambda p=p: generate_fn(p)) for p in prompts) / len(prompts)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--write", type=Path, help="update this markdown file's section")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the generate calls")
    parser.add_argument("--decode-rounds", type=int, default=5, help="rounds of the decode-only figures")
    parser.add_argument(
        "--blocks", type=int, default=4, help=f"timed blocks of {GREEDY_CHUNK} steps per decode round"
    )
    args = parser.parse_args()
    tune_cpu_allocator()
    torch.manual_seed(0)
    n = args.new_tokens
    ours = build("ours").eval()
    engine = Engine(ours)
    ours_hf = MambaSLMForCausalLM.from_core(ours).eval()
    llama = build("llama").eval()
    mamba2 = build("mamba2").eval()
    prompts = [random_prompt(engine, 8, seed=i)[0] for i in range(PROMPTS)]
    config = GenerationConfig(max_new_tokens=n, temperature=0)

    def hf_generate(model):
        def run(prompt):
            with torch.inference_mode():
                model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                               pad_token_id=0, eos_token_id=None)  # fmt: skip

        return run

    compiled = Engine(
        build("ours").eval(), compile=True
    )  # the same weights (same seed), compiled decode step
    compiled.model.load_state_dict(ours.state_dict())
    bf16 = Engine(copy.deepcopy(ours).to(torch.bfloat16))  # the same weights rounded to bf16
    runners = {
        "ours": lambda p: engine.generate([p], config),
        "ours_bf16": lambda p: bf16.generate([p], config),
        "ours_compiled": lambda p: compiled.generate([p], config),
        "ours_hf": hf_generate(ours_hf),
        "llama": hf_generate(llama),
        "mamba2": hf_generate(mamba2),
    }
    speeds: dict[str, float] = {}
    for run in runners.values():  # warm-up
        run(prompts[0])
    for _ in range(args.rounds):
        for name, run in runners.items():
            speeds[name] = max(speeds.get(name, 0.0), greedy_tok_s(run, prompts, n))
        print({k: round(v, 1) for k, v in speeds.items()}, flush=True)

    # Decode-only figures: per engine, the positions (and the batch sizes) decode side by side,
    # timed block by block in turn; every round adds its blocks to the engine's lists.
    def decode_blocks(eng: Engine, positions: tuple[int, ...], batches: tuple[int, ...]) -> dict:
        sets = {("latency", pos): random_prompt(eng, pos) for pos in positions}
        blocks = dict(
            zip(
                sets,
                interleaved_step_seconds(eng, list(sets.values()), args.blocks, GREEDY_CHUNK),
                strict=True,
            )
        )
        if batches:
            sets = {("batch", b): random_prompt(eng, 32, b) for b in batches}
            runs = interleaved_step_seconds(eng, list(sets.values()), args.blocks, GREEDY_CHUNK)
            blocks |= dict(zip(sets, runs, strict=True))
        return blocks

    bf16_kv = Engine(ours, kv_cache_dtype=torch.bfloat16)  # the same model, keys and values in bf16
    seconds: dict[str, dict] = {"eager": {}, "compiled": {}, "bf16_kv": {}, "bf16": {}}
    bandwidth = 0.0  # the best of the rounds too, like the step times it is compared with
    for _ in range(args.decode_rounds):
        bandwidth = max(bandwidth, read_bandwidth_gbs())
        for label, eng, positions, batches in (
            ("eager", engine, (128, 1024, 4096), (1, 4, 16)),
            ("compiled", compiled, (128, 4096), (1, 16)),
            ("bf16_kv", bf16_kv, (128, 4096), ()),
            ("bf16", bf16, (128, 4096), (1, 16)),
        ):
            for key, blocks in decode_blocks(eng, positions, batches).items():
                seconds[label].setdefault(key, []).extend(blocks)

    def figures(label: str, positions: tuple[int, ...], batches: tuple[int, ...]) -> tuple[dict, dict, dict]:
        """Fastest-block latency per position, tokens/s per batch size, and the paired ratios."""
        blocks = seconds[label]
        latency = {pos: min(blocks[("latency", pos)]) for pos in positions}
        batch = {b: b / min(blocks[("batch", b)]) for b in batches}
        ratios = {"4k": paired_ratio(blocks[("latency", 4096)], blocks[("latency", 128)])}
        if batches:  # tokens/s of batch 16 over batch 1's
            ratios["batch"] = paired_ratio([16 * t for t in blocks[("batch", 1)]], blocks[("batch", 16)])
        return latency, batch, ratios

    latency, batch, ratio = figures("eager", (128, 1024, 4096), (1, 4, 16))
    compiled_latency, compiled_batch, compiled_ratio = figures("compiled", (128, 4096), (1, 16))
    bf16_latency, _, bf16_ratio = figures("bf16_kv", (128, 4096), ())
    half_latency, half_batch, half_ratio = figures("bf16", (128, 4096), (1, 16))
    pairs = ratio["4k"]["blocks"]
    half_bytes = weight_bytes_per_token(bf16.model)
    half_bound = bandwidth * 1e9 / half_bytes
    wbytes = weight_bytes_per_token(ours)
    kv = {pos: kv_bytes_per_token(ours, pos) for pos in (128, 4096)}
    floor = (wbytes + kv[4096]) / (wbytes + kv[128])  # the 4k/128 ratio if both steps ran at the bound
    bound = bandwidth * 1e9 / wbytes
    step_ms = 1000 * latency[128]
    body = "\n".join([
        f"Machine: {os.cpu_count()} cores, {torch.get_num_threads()} threads, torch {torch.__version__}; fp32, "
        f"batch 1 greedy, {n} new tokens after an 8-token prompt, {PROMPTS} prompts, best of {args.rounds} rounds.",
        "",
        "| generator | tokens/s | ours vs it |",
        "|---|---|---|",
        f"| mamba-slm `Engine` | {speeds['ours']:.1f} | 1.00x |",
        f"| mamba-slm `Engine`, bf16 weights (`--dtype bfloat16`; not the same numbers) | "
        f"{speeds['ours_bf16']:.1f} | {speeds['ours'] / speeds['ours_bf16']:.2f}x |",
        f"| mamba-slm `Engine(compile=True)` (compiled decode step) | {speeds['ours_compiled']:.1f} | "
        f"{speeds['ours'] / speeds['ours_compiled']:.2f}x |",
        f"| our model through transformers `generate` (same weights) | {speeds['ours_hf']:.1f} | "
        f"{speeds['ours'] / speeds['ours_hf']:.2f}x |",
        f"| HF Llama `generate` (same size) | {speeds['llama']:.1f} | {speeds['ours'] / speeds['llama']:.2f}x |",
        f"| HF Mamba2 `generate` (same size) | {speeds['mamba2']:.1f} | {speeds['ours'] / speeds['mamba2']:.2f}x |",
        "",
        f"Our engine, decode only (prefill excluded): {args.decode_rounds} rounds of {args.blocks} timed blocks of "
        f"{GREEDY_CHUNK} greedy steps (one call of the C kernels each), the contexts (and the batch sizes) decoding side by side, their blocks taken in turn. "
        f"Latency and tokens/s: the fastest block. Ratios: the median of the {pairs} block-by-block ratios "
        f"(quartiles in brackets); the ratio of the fastest blocks, which may come from different minutes, after it.",
        "",
        "| per-token latency at context 128 / 1k / 4k | 4k vs 128 | batch 1 / 4 / 16 tokens/s | batch 16 vs 1 |",
        "|---|---|---|---|",
        f"| {' / '.join(f'{1000 * latency[p]:.2f} ms' for p in latency)} | {_ratio(ratio['4k'])}; "
        f"{latency[4096] / latency[128]:.2f}x | {' / '.join(f'{batch[b]:.0f}' for b in batch)} | "
        f"{_ratio(ratio['batch'])}; {batch[16] / batch[1]:.2f}x |",
        f"| compiled: {1000 * compiled_latency[128]:.2f} ms / - / {1000 * compiled_latency[4096]:.2f} ms | "
        f"{_ratio(compiled_ratio['4k'])} | {compiled_batch[1]:.0f} / - / {compiled_batch[16]:.0f} | "
        f"{_ratio(compiled_ratio['batch'])} |",
        f"| bf16 KV cache (`--kv-cache-dtype bfloat16`): {1000 * bf16_latency[128]:.2f} ms / - / "
        f"{1000 * bf16_latency[4096]:.2f} ms | {_ratio(bf16_ratio['4k'])} | - | - |",
        f"| bf16 weights (`--dtype bfloat16`, bf16 KV cache): {1000 * half_latency[128]:.2f} ms / - / "
        f"{1000 * half_latency[4096]:.2f} ms | {_ratio(half_ratio['4k'])} | "
        f"{half_batch[1]:.0f} / - / {half_batch[16]:.0f} | {_ratio(half_ratio['batch'])} |",
        "",
        f"Memory-bandwidth bound of batch-1 decode: {wbytes / 1e6:.1f} MB of weights read per token / "
        f"{bandwidth:.1f} GB/s measured read bandwidth = {bound:.0f} tokens/s ({1000 / bound:.2f} ms/token); "
        f"our decode step takes {step_ms:.2f} ms at context 128 ({100 * (1000 / bound) / step_ms:.0f}% of the bound's speed), "
        f"compiled {1000 * compiled_latency[128]:.2f} ms ({100 * (1000 / bound) / (1000 * compiled_latency[128]):.0f}%). "
        f"At context 4k a step also reads {kv[4096] / 1e6:.1f} MB of cached keys and values (128: {kv[128] / 1e6:.1f} MB), "
        f"so at the bound the 4k vs 128 latency ratio would be {floor:.2f}x. "
        f"With bf16 weights a step reads {half_bytes / 1e6:.1f} MB: bound {half_bound:.0f} tokens/s "
        f"({1000 / half_bound:.2f} ms/token), and the bf16 step takes {1000 * half_latency[128]:.2f} ms "
        f"({100 * (1000 / half_bound) / (1000 * half_latency[128]):.0f}% of that bound's speed). "
        f"Peak RSS of this run: {max_rss_mb():.0f} MB.",
        "",
    ])  # fmt: skip
    print(body)
    if args.write:
        write_section(args.write, "Generation speed", "make bench (benchmarks/generation_speed.py)", body)


if __name__ == "__main__":
    main()
