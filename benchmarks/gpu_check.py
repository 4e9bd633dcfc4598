"""GPU check: the model core's correctness properties and speed on CUDA, in one short run.

    python benchmarks/gpu_check.py [--out results.json]

Correctness (fp32 unless noted): chunked SSD == sequential reference (values and gradients),
full forward == prefill + recurrent steps (every positional encoding, a sliding window, both
mixers), left-padded batch == rows alone, HF generate greedy == argmax loop, a bf16 autocast
training run whose loss falls. Speed: training tokens/s (bf16 autocast, batch 8 x 1024) and
prefill tokens/s at 4096 for our hybrid and HF Llama at the benchmark size, and whether the
mamba_ssm/causal_conv1d kernels were found. Prints one line per check and a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mamba_slm import HybridLM, ModelConfig  # noqa: E402
from mamba_slm.model.ssd import ssd_chunked, ssd_reference  # noqa: E402
from mamba_slm.model.ssm import cuda_kernels  # noqa: E402

DEV = torch.device("cuda")
RESULTS: dict[str, object] = {}


def check(name: str, fn) -> None:
    try:
        detail = fn()
        RESULTS[name] = {"ok": True, **(detail or {})}
        print(f"PASS {name} {detail or ''}", flush=True)
    except Exception as e:  # report every check, whatever fails
        RESULTS[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:300]}
        print(f"FAIL {name}: {type(e).__name__}: {e}"[:400], flush=True)


def tiny(**kw) -> HybridLM:
    torch.manual_seed(0)
    return HybridLM(ModelConfig.from_preset("tiny", **kw)).to(DEV).eval()


def ssd_matches_reference():
    torch.manual_seed(0)
    b, seqlen, h, p, g, n = 2, 100, 4, 16, 2, 16
    x, B, C = torch.randn(b, seqlen, h, p), torch.randn(b, seqlen, g, n), torch.randn(b, seqlen, g, n)
    dt = torch.nn.functional.softplus(torch.randn(b, seqlen, h) - 1)
    A = -torch.rand(h) * 4 - 0.5
    ins = [t.to(DEV).requires_grad_() for t in (x, dt, A, B, C)]
    y, s = ssd_chunked(*ins, chunk_size=32)
    yr, sr = ssd_reference(*ins)
    torch.testing.assert_close(y, yr, atol=1e-4, rtol=1e-4)
    g1 = torch.autograd.grad((y * y).sum() + s.sum(), ins)
    g2 = torch.autograd.grad((yr * yr).sum() + sr.sum(), ins)
    err = max((a - b).abs().max().item() for a, b in zip(g1, g2, strict=True))
    assert err < 1e-3, err
    return {"max_grad_err": err}


def cache_matches_forward():
    errs = {}
    for name, kw in {
        "rope": {}, "alibi": {"pos_encoding": "alibi"}, "none": {"pos_encoding": "none"},
        "window": {"sliding_window": 7}, "yarn": {"rope_scaling": {"type": "yarn", "factor": 4.0}},
        "mamba1": {"mixer": "mamba1"},
    }.items():  # fmt: skip
        model = tiny(**kw)
        ids = torch.randint(0, 256, (2, 40), device=DEV)
        with torch.no_grad():
            full = model(ids).logits
            cache = model.allocate_cache(2, capacity=8)
            parts = [model(ids[:, :17], cache=cache).logits]
            parts += [model(ids[:, t : t + 1], cache=cache).logits for t in range(17, 40)]
        errs[name] = (torch.cat(parts, 1) - full).abs().max().item()
        assert errs[name] < 1e-3, errs
    return {"max_err": max(errs.values())}


def left_padding():
    model = tiny()
    rows = [torch.randint(1, 256, (n,), device=DEV) for n in (21, 9)]
    ids = torch.zeros(2, 21, dtype=torch.long, device=DEV)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, 21 - len(r) :], mask[i, 21 - len(r) :] = r, 1
    with torch.no_grad():
        out = model(ids, attention_mask=mask).logits
        err = max(
            (out[i, 21 - len(r) :] - model(r[None]).logits[0]).abs().max().item() for i, r in enumerate(rows)
        )
    assert err < 1e-3, err
    return {"max_err": err}


def hf_generate():
    from transformers import AutoModelForCausalLM

    import mamba_slm.hf  # noqa: F401

    model = tiny()
    path = Path("/tmp/gpu_check_model")
    model.save_pretrained(path)
    hf = AutoModelForCausalLM.from_pretrained(path).to(DEV).eval()
    ids = torch.randint(0, 256, (2, 7), device=DEV)
    with torch.no_grad():
        out = hf.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
        ref = ids
        for _ in range(10):
            ref = torch.cat([ref, model(ref).logits[:, -1].argmax(-1, keepdim=True)], 1)
        beams = hf.generate(
            ids, max_new_tokens=6, num_beams=3, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    assert torch.equal(out, ref)
    return {"beam_shape": list(beams.shape)}


def bf16_training():
    model = tiny().train()
    ids = torch.randint(0, 256, (4, 8), device=DEV).repeat(1, 8)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids, labels=ids, return_logits=False).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    return {"loss_first": round(losses[0], 3), "loss_last": round(losses[-1], 3)}


def speed():
    from model_speed import build

    out = {"kernels_found": cuda_kernels() is not None}
    for name in ("ours", "llama"):
        torch.manual_seed(0)
        model = build(name).to(DEV).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        ids = torch.randint(0, 8192, (8, 1024), device=DEV)
        extra = {"return_logits": False} if name == "ours" else {}

        def step(model=model, opt=opt, ids=ids, extra=extra):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids, **extra).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        for _ in range(3):
            step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(10):
            step()
        torch.cuda.synchronize()
        out[f"{name}_train_tok_s"] = round(10 * ids.numel() / (time.perf_counter() - t0))
        out[f"{name}_train_peak_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        model.eval()
        long = torch.randint(0, 8192, (1, 4096), device=DEV)
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            kw = {"num_logits_to_keep": 1} if name == "ours" else {"logits_to_keep": 1, "use_cache": False}
            for _ in range(3):
                model(long, **kw)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(10):
                model(long, **kw)
            torch.cuda.synchronize()
        out[f"{name}_prefill4096_tok_s"] = round(10 * 4096 / (time.perf_counter() - t0))
        del model, opt
        torch.cuda.empty_cache()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", help="write the JSON summary here")
    args = parser.parse_args()
    print(torch.__version__, torch.cuda.get_device_name(0), flush=True)
    for name, fn in [
        ("ssd_chunked_vs_reference", ssd_matches_reference),
        ("prefill_steps_vs_forward", cache_matches_forward),
        ("left_padding", left_padding),
        ("hf_generate_greedy_and_beam", hf_generate),
        ("bf16_training_loss_falls", bf16_training),
        ("speed", speed),
    ]:
        check(name, fn)
    print(json.dumps(RESULTS, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(RESULTS, indent=1))


if __name__ == "__main__":
    main()
