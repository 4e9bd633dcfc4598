"""Model speed: our hybrid against HF Llama, Mamba2 and Jamba at equal size, in one run.

    python benchmarks/model_speed.py [--write docs/benchmarks.md] [--models ours,llama,...]

Every model is built at about the same parameter count (vocab 8192, d_model 512, 8 layers; the
hybrids have 2 attention layers at the same places) and measured in its own subprocess, so
peak memory (max RSS of that process) is its own. Measured: training tokens/s (batch 8 x 256,
AdamW, fp32), achieved training GFLOP/s against this machine's measured fp32 matmul peak, and
prefill (forward, no grad, batch 1) tokens/s at 512 and 4096 tokens. Ratios are to HF Llama.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

VOCAB, D_MODEL, N_LAYERS, BATCH, SEQLEN = 8192, 512, 8, 8, 256
MLP = 1376  # Llama's SwiGLU width at this size
MODELS = ["ours", "llama", "mamba2", "jamba"]
LABELS = {"ours": "mamba-slm hybrid", "llama": "HF Llama", "mamba2": "HF Mamba2", "jamba": "HF Jamba"}


# ---------------------------------------------------------------------------- model builders
def build(name: str):
    import torch  # noqa: F401

    if name == "ours":
        from mamba_slm import HybridLM, ModelConfig

        cfg = ModelConfig(
            vocab_size=VOCAB, d_model=D_MODEL, layer_pattern="MMAMMMAM", d_state=64, head_dim=64,
            n_heads=8, n_kv_heads=8, d_intermediate=1088, chunk_size=64, max_position_embeddings=4096,
        )  # fmt: skip
        return HybridLM(cfg)
    if name == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(
            vocab_size=VOCAB, hidden_size=D_MODEL, intermediate_size=MLP, num_hidden_layers=N_LAYERS,
            num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=4096, tie_word_embeddings=True,
        )  # fmt: skip
        return LlamaForCausalLM(cfg)
    if name == "mamba2":
        from transformers import Mamba2Config, Mamba2ForCausalLM

        cfg = Mamba2Config(
            vocab_size=VOCAB, hidden_size=D_MODEL, num_hidden_layers=N_LAYERS, expand=4, head_dim=64,
            num_heads=4 * D_MODEL // 64, state_size=64, n_groups=1, chunk_size=64, tie_word_embeddings=True,
        )  # fmt: skip
        return Mamba2ForCausalLM(cfg)
    if name == "jamba":
        from transformers import JambaConfig, JambaForCausalLM

        cfg = JambaConfig(
            vocab_size=VOCAB, hidden_size=D_MODEL, intermediate_size=1088, num_hidden_layers=N_LAYERS,
            num_attention_heads=8, num_key_value_heads=8, attn_layer_period=4, attn_layer_offset=2,
            expert_layer_period=100, num_experts=1, mamba_d_state=16, mamba_expand=2, use_mamba_kernels=False,
            tie_word_embeddings=True, max_position_embeddings=4096,
        )  # fmt: skip
        return JambaForCausalLM(cfg)
    raise ValueError(name)


def count_params(model) -> tuple[int, int]:
    """(all parameters, parameters in matmuls incl. the LM head)."""
    import torch

    params = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in params.values())
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    return total, matmul


def train_flops_per_token(name: str, matmul_params: int, seqlen: int) -> float:
    """6 x matmul params + the sequence mixing matmuls (attention scores; SSD's chunk matmuls)."""
    flops = 6.0 * matmul_params
    n_attn = 2 if name in ("ours", "jamba") else (N_LAYERS if name == "llama" else 0)
    flops += 3 * n_attn * 2 * seqlen * D_MODEL  # QK^T and AV, causal half, forward x3
    if name in ("ours", "mamba2"):
        n_ssd, d_inner = (6, 2 * D_MODEL) if name == "ours" else (N_LAYERS, 4 * D_MODEL)
        q, n = 64, 64
        per_token = 2 * q * n + 2 * q * d_inner + 2 * 2 * d_inner * n  # CB, (CB)x, chunk states + output
        flops += 3 * n_ssd * per_token
    return flops


# ---------------------------------------------------------------------------- measurements
def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed_steps(fn, min_steps: int = 3, budget_s: float = 20.0, warmup: int = 2) -> float:
    """Seconds per call (the fastest): warm-up calls, then calls until min_steps or the budget is spent."""
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_steps and (not times or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def worker_train(name: str) -> dict:
    import torch

    torch.manual_seed(0)
    model = build(name).train()
    total, matmul = count_params(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, VOCAB, (BATCH, SEQLEN))

    # Each model's own training call: ours skips materialising the logits (as `mamba-slm train` does).
    extra = {"return_logits": False} if name == "ours" else {}

    def step():
        loss = model(input_ids=ids, labels=ids, **extra).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    sec = timed_steps(step, min_steps=4, budget_s=40.0, warmup=1 if name == "jamba" else 2)
    tokens = BATCH * SEQLEN
    return {
        "params": total,
        "train_tok_s": tokens / sec,
        "train_gflops": train_flops_per_token(name, matmul, SEQLEN) * tokens / sec / 1e9,
        "train_peak_mb": max_rss_mb(),
    }


def worker_prefill(name: str, seqlen: int) -> dict:
    import torch

    torch.manual_seed(0)
    model = build(name).eval()
    ids = torch.randint(0, VOCAB, (1, seqlen))

    def run():
        with torch.inference_mode():
            if name == "ours":
                model(ids, num_logits_to_keep=1)
            else:
                model(input_ids=ids, use_cache=False, logits_to_keep=1)

    sec = timed_steps(run, min_steps=3, budget_s=20.0)
    return {f"prefill_{seqlen}_tok_s": seqlen / sec, f"prefill_{seqlen}_peak_mb": max_rss_mb()}


def matmul_peak_gflops(size: int = 2048, reps: int = 10) -> dict[str, float]:
    """Best fp32 GFLOP/s of a square product through PyTorch's default (MKL's sgemm) and through
    oneDNN (`mamba_slm.model.linear.matmul_t`, which our Linear uses); "peak" is the higher."""
    import torch

    from mamba_slm.model.linear import matmul_t

    a, b = torch.randn(size, size), torch.randn(size, size)
    rates = {}
    for name, product in (("mkl", lambda: a @ b), ("onednn", lambda: matmul_t(a, b.t()))):
        for _ in range(3):
            product()
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            product()
            best = min(best, time.perf_counter() - t0)
        rates[name] = 2 * size**3 / best / 1e9
    rates["peak"] = max(rates.values())
    return rates


def run_worker(args: list[str], default_allocator: bool = False) -> dict:
    flags = ["--default-allocator"] if default_allocator else []
    out = subprocess.run(
        [sys.executable, __file__, *flags, "--worker", *args], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def merge(into: dict, new: dict) -> None:
    """Best throughput, largest peak memory (both are maxima); anything else is replaced."""
    for key, value in new.items():
        into[key] = max(into[key], value) if isinstance(value, float) and key in into else value


# ---------------------------------------------------------------------------- report
def fmt_ratio(value: float | None, base: float | None) -> str:
    return f"{value / base:.2f}x" if value and base else "-"


def report(results: dict[str, dict], rates: dict[str, float], threads: int) -> str:
    peak = rates["peak"]
    rows = [
        "| model | params | train tok/s | vs Llama | train GFLOP/s | % of fp32 peak | train peak MB | "
        "prefill 512 tok/s | prefill 4096 tok/s | 4096 vs Llama |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = results.get("llama", {})
    for name, r in results.items():
        if "error" in r:
            rows.append(f"| {LABELS[name]} | error: {r['error']} |" + " |" * 8)
            continue
        rows.append(
            f"| {LABELS[name]} | {r['params'] / 1e6:.1f}M | {r['train_tok_s']:.0f} | "
            f"{fmt_ratio(r['train_tok_s'], base.get('train_tok_s'))} | {r['train_gflops']:.0f} | "
            f"{100 * r['train_gflops'] / peak:.0f}% | {r['train_peak_mb']:.0f} | "
            f"{r.get('prefill_512_tok_s', 0):.0f} | {r.get('prefill_4096_tok_s', 0):.0f} | "
            f"{fmt_ratio(r.get('prefill_4096_tok_s'), base.get('prefill_4096_tok_s'))} |"
        )
    ours = results.get("ours", {})
    lines = [
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {threads}; "
        f"fp32 matmul measured (2048^3): MKL sgemm (PyTorch's default) {rates['mkl']:.0f} GFLOP/s, "
        f"oneDNN {rates['onednn']:.0f} GFLOP/s; the % column is of the higher.",
        "",
        *rows,
        "",
    ]
    if "jamba" in results and "train_tok_s" in results["jamba"] and "train_tok_s" in ours:
        lines.append(
            f"Training throughput vs HF Jamba: {ours['train_tok_s'] / results['jamba']['train_tok_s']:.1f}x."
        )
    if "mamba2" in results and "train_tok_s" in results["mamba2"] and "train_tok_s" in ours:
        lines.append(
            f"Training throughput vs HF Mamba2: {ours['train_tok_s'] / results['mamba2']['train_tok_s']:.1f}x."
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--models", default=",".join(MODELS), help="comma-separated subset of " + ",".join(MODELS)
    )
    parser.add_argument("--write", help="write the results section into this markdown file")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved measurement rounds (best kept)")
    parser.add_argument(
        "--default-allocator", action="store_true", help="leave glibc malloc untuned (see mamba_slm.runtime)"
    )
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        from mamba_slm.runtime import tune_cpu_allocator

        if not args.default_allocator:  # the same process settings for every model
            tune_cpu_allocator()
        kind, name, *rest = args.worker
        result = worker_train(name) if kind == "train" else worker_prefill(name, int(rest[0]))
        print(json.dumps(result))
        return

    import torch

    names = [m for m in args.models.split(",") if m]
    rates = matmul_peak_gflops()
    print(f"fp32 matmul GFLOP/s: {json.dumps({k: round(v) for k, v in rates.items()})} "
          f"({torch.get_num_threads()} threads)", flush=True)  # fmt: skip
    results: dict[str, dict] = {name: {} for name in names}
    # Rounds interleave the models, so a slow spell of a shared machine hits all of them; each
    # keeps its best throughput and its largest peak memory.
    for round_ in range(args.rounds):
        for name in names:
            if name == "jamba" and round_ > 0:
                continue  # one round of Jamba takes minutes and its ratio is not close
            jobs = [["train", name]] + [["prefill", name, str(n)] for n in (512, 4096)]
            for job in jobs:
                merge(results[name], run_worker(job, args.default_allocator))
            shown = {k: round(v, 1) if isinstance(v, float) else v for k, v in results[name].items()}
            print(f"round {round_ + 1}", name, json.dumps(shown), flush=True)
    text = report(results, rates, torch.get_num_threads())
    print(text)
    if args.write:
        write_section(Path(args.write), "Model speed", "python benchmarks/model_speed.py", text)


def write_section(path: Path, title: str, command: str, body: str) -> None:
    """Replace (or append) the `## title` section of a markdown file, keeping the others."""
    start, end = f"<!-- {title}: start -->", f"<!-- {title}: end -->"
    section = f"{start}\n## {title}\n\nCommand: `{command}` ({time.strftime('%Y-%m-%d')})\n\n{body}{end}\n"
    text = path.read_text() if path.exists() else "# Benchmarks\n\nMade by `make bench`.\n\n"
    if start in text and end in text:
        text = text[: text.index(start)] + section + text[text.index(end) + len(end) + 1 :]
    else:
        text += "\n" + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


if __name__ == "__main__":
    main()
