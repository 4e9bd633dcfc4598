"""Training speed: tokens/s and peak memory of the `small` and `base` presets through the
training loop (`Trainer`), plain fp32, with gradient checkpointing, and in bf16.

    python benchmarks/train_speed.py [--write docs/benchmarks.md]

Each configuration runs in its own process (so peak RSS is its own): batch 8 x 256 tokens,
vocab 8192, AdamW, a few optimizer steps after a warm-up; tokens/s is the best step.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

CONFIGS = [
    (preset, name, extra)
    for preset in ("small", "base")
    for name, extra in (("fp32", {}), ("fp32 + checkpointing", {"gradient_checkpointing": True}),
                        ("bf16", {"mixed_precision": "bf16"}))
]  # fmt: skip


def worker(preset: str, extra: dict) -> dict:
    import tempfile

    import torch

    from mamba_slm import HybridLM, ModelConfig
    from mamba_slm.train import TrainArgs, Trainer

    torch.manual_seed(0)
    model = HybridLM(ModelConfig.from_preset(preset, vocab_size=8192))
    g = torch.Generator().manual_seed(0)
    blocks = [torch.randint(0, 8192, (257,), generator=g).tolist() for _ in range(64)]
    steps = 4 if preset == "small" else 3
    with tempfile.TemporaryDirectory() as out:
        args = TrainArgs(output_dir=out, max_steps=steps, batch_size=8, eval_steps=0, save_steps=0,
                         logging_steps=1, show_progress=False, **extra)  # fmt: skip
        trainer = Trainer(model, blocks, [], args)
        result = trainer.train()
    rates = [e["tokens_per_s"] for e in result["log"] if "tokens_per_s" in e][1:]  # skip the warm-up step
    return {"params": model.num_parameters(), "tok_s": max(rates),
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--write", help="write the results section into this markdown file")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], json.loads(args.worker[1]))))
        return
    rows = ["| preset | params | mode | train tok/s | peak MB |", "|---|---|---|---|---|"]
    for preset, name, extra in CONFIGS:
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, __file__, "--worker", preset, json.dumps(extra)],
                             capture_output=True, text=True)  # fmt: skip
        if out.returncode != 0:
            rows.append(f"| {preset} | - | {name} | error: {out.stderr.strip().splitlines()[-1]} | - |")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(
            f"| {preset} | {r['params'] / 1e6:.1f}M | {name} | {r['tok_s']:.0f} | {r['peak_mb']:.0f} |"
        )
        print(rows[-1], f"({time.perf_counter() - t0:.0f} s)", flush=True)
    body = (
        f"{os.cpu_count()} cores; batch 8 x 256, vocab 8192, AdamW, through `Trainer`.\n\n"
        + "\n".join(rows)
        + "\n"
    )
    print(body)
    if args.write:
        from model_speed import write_section

        write_section(Path(args.write), "Training speed", "python benchmarks/train_speed.py", body)


if __name__ == "__main__":
    main()
