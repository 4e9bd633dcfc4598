"""Fused fp32 CPU kernels (`kernels.c`), compiled on first use with the system's C compiler.

Why hand-written: on a CPU, the Mamba block's memory-bound glue (causal conv + SiLU, the gated
RMSNorm), RMSNorm, SwiGLU and the LM head's softmax cost PyTorch several passes over large
tensors each, forward and backward, and that glue made a training step of the hybrid slower
than a transformer's of the same size; one OpenMP loop per op does each in one or two passes.
Decoding is the other way round: tiny tensors, where a step was dominated by MKL's one-thread
matrix-vector products and by dispatching ~30 small ops per block. There the kernels are the
few-row products (`linear_rows`), a Mamba-2 step, a block's MLP branch and the attention of
one query over the cache, each one call. mamba-ssm fuses the training ops on CUDA; nothing in
the ecosystem does any of this on a CPU.

The library is built with `gcc -O3 -march=native -fopenmp` into a per-user cache (keyed by the
source, the flags, the compiler and the CPU), written atomically, loaded with ctypes, and
shares PyTorch's OpenMP thread pool. Without a C compiler, or with `MAMBA_SLM_KERNELS=0`,
`library()` is None and callers run the same math in PyTorch (the tests compare the two).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import warnings
from pathlib import Path

import torch
from torch import Tensor

from .. import data

SOURCE = Path(__file__).with_name("kernels.c")
FLAG_SETS = (
    ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-shared", "-fPIC"],
    ["-O3", "-ffast-math", "-fopenmp", "-shared", "-fPIC"],  # compilers without -march=native
)

_P, _L, _I, _F = ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_float
# hybrid_greedy's 23 arguments (a list of its own: in the dict below, the formatter splits it one per line)
_HYBRID_GREEDY = [_P, _L, _P, _I, _P, _F, _P, _L, _L, _P, _L, _L, _P, _P, _L, _P, _L, _L, _P, _L, _P, _P, _I]
_SIGNATURES = {
    "conv_silu_fwd": [_P, _L, _P, _P, _P, _P, _L, _L, _L, _L, _I],
    "conv_silu_bwd": [_P, _L, _P, _P, _P, _P, _P, _P, _L, _L, _L, _L, _I],
    "gated_norm_fwd": [_P, _L, _P, _L, _P, _P, _L, _L, _L, _F, _I],
    "gated_norm_bwd": [_P, _L, _P, _L, _P, _P, _P, _P, _P, _P, _L, _L, _L, _F, _I],
    "swiglu_fwd": [_P, _P, _P, _L, _I],
    "swiglu_bwd": [_P, _P, _P, _P, _P, _L, _I],
    "rowdot": [_P, _L, _P, _L, _P, _L, _L, _I],
    "rms_norm_fwd": [_P, _L, _P, _P, _L, _L, _F, _I],
    "rms_norm_bwd": [_P, _L, _P, _P, _P, _P, _P, _L, _L, _F, _I],
    "softmax_xent": [_P, _L, _L, _P, _P, _P, _I],
    "linear_rows": [_P, _L, _P, _I, _P, _P, _L, _L, _L, _I],
    "mamba2_step": [_P, _L, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P] + [_L] * 8 + [_F, _I],
    "attend_one": [
        _P,
        _L,
        _L,
        _P,
        _L,
        _L,
        _L,
        _P,
        _L,
        _L,
        _L,
        _I,
        _P,
        _L,
        _P,
        _P,
        _L,
        _L,
        _L,
        _L,
        _L,
        _F,
        _I,
    ],
    "mlp_rows": [_P, _P, _F, _P, _P, _P, _I, _P, _P, _P, _P, _L, _L, _L, _I],
    "hybrid_step": [_P, _L, _P, _L, _L, _P, _P, _P, _L, _L, _L, _P, _I],
    "hybrid_rewind": [_P, _L, _P, _L, _I],
    "hybrid_greedy": _HYBRID_GREEDY,
}
_RETURNS = {"hybrid_step": ctypes.c_int, "hybrid_rewind": ctypes.c_int, "hybrid_greedy": ctypes.c_long}


def cache_dir() -> Path:
    """Beside the downloaded corpora: ~/.cache/mamba-slm/kernels (MAMBA_SLM_CACHE moves both)."""
    return data.cache_dir() / "kernels"


def _cpu_id() -> str:
    """What -march=native depends on: the CPU's model and feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return "".join(line for line in lines if line.startswith(("model name", "flags")))[:4000]


def _build(compiler: str, flags: list[str], target: Path) -> None:
    """Compile into a temporary file next to `target`, then rename: a concurrent or interrupted
    build never leaves a half-written library behind."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    try:
        subprocess.run(
            [compiler, *flags, str(SOURCE), "-o", str(tmp), "-lm"],
            check=True,
            capture_output=True,
            timeout=300,
        )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


loaded = False  # set once the library is loaded: a plain global that torch.compile can read


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None (no compiler, a failed build, or MAMBA_SLM_KERNELS=0)."""
    global loaded
    loaded = False
    if os.environ.get("MAMBA_SLM_KERNELS", "1") == "0":
        return None
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        return None
    errors = []
    for flags in FLAG_SETS:
        try:
            version = subprocess.run(
                [compiler, "--version"], capture_output=True, text=True, timeout=30
            ).stdout
            key = "\n".join([SOURCE.read_text(), " ".join(flags), version, platform.machine(), _cpu_id()])
            target = cache_dir() / f"kernels-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"
            if not target.exists():
                _build(compiler, flags, target)
            lib = ctypes.CDLL(str(target))
        except (OSError, subprocess.SubprocessError) as err:
            stderr = getattr(err, "stderr", b"") or b""
            errors.append(f"{err} {stderr.decode(errors='replace').strip()[:200]}")
            continue
        for name, argtypes in _SIGNATURES.items():
            getattr(lib, name).argtypes = argtypes
            getattr(lib, name).restype = _RETURNS.get(name)
        loaded = True
        return lib
    warnings.warn(f"mamba-slm: fused CPU kernels unavailable, using PyTorch ops ({errors[-1]})", stacklevel=2)
    return None


def _as_rows(t: Tensor) -> Tensor | None:
    """t viewed as (rows, last dim) with unit column stride, or None if its layout does not allow it."""
    try:
        rows = t.view(-1, t.shape[-1])
    except RuntimeError:
        return None
    return rows if rows.stride(1) == 1 or rows.shape[1] == 1 else None


def _rows(t: Tensor) -> Tensor:
    rows = _as_rows(t)
    return rows if rows is not None else t.contiguous().view(-1, t.shape[-1])


MIN_ELEMENTS = 16384  # below this (a decode step's rows) PyTorch's dispatch beats a ctypes call


def fp32_cpu(*tensors: Tensor | None) -> bool:
    """True if the kernels are loaded and these tensors are fp32 on a CPU (outside torch.compile).
    Enough for kernels that take any layout (they copy what is not row-major)."""
    if torch.compiler.is_compiling():  # inside torch.compile: the traced PyTorch ops, never ctypes
        return False
    present = [t for t in tensors if t is not None]
    return library() is not None and all(t.dtype is torch.float32 and t.device.type == "cpu" for t in present)


def supports(*tensors: Tensor | None, min_elements: int | None = None) -> bool:
    """`fp32_cpu`, with row-major rows (the kernel reads them in place), and the first tensor
    large enough (`min_elements`, default MIN_ELEMENTS) to gain from a fused loop."""
    present = [t for t in tensors if t is not None]
    if present[0].numel() < (MIN_ELEMENTS if min_elements is None else min_elements):
        return False
    return fp32_cpu(*present) and all(_as_rows(t) is not None for t in present)


def _ptr(t: Tensor | None) -> int | None:
    return t.data_ptr() if t is not None else None


def _threads(elements: int) -> int:
    """PyTorch's threads, or one for small work (a decode step), where waking the pool costs more."""
    return torch.get_num_threads() if elements >= 32768 else 1


def conv_silu_forward(x: Tensor, weight: Tensor, bias: Tensor | None, prev: Tensor | None = None) -> Tensor:
    """silu(causal depthwise conv). x: (b, l, c); weight: (c, k); prev: (b, k-1, c) window or None."""
    b, seqlen, c = x.shape
    k = weight.shape[1]
    wt = weight.t().contiguous()
    prev = prev.contiguous() if prev is not None else None
    out = torch.empty(b, seqlen, c, dtype=x.dtype)
    xr = _rows(x)
    library().conv_silu_fwd(
        xr.data_ptr(),
        xr.stride(0),
        _ptr(prev),
        wt.data_ptr(),
        _ptr(bias),
        out.data_ptr(),
        b,
        seqlen,
        c,
        k,
        _threads(x.numel()),
    )
    return out


def conv_silu_backward(
    x: Tensor, weight: Tensor, bias: Tensor | None, dout: Tensor
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(dx, dweight (c, k), dbias) of `conv_silu_forward` without a window."""
    b, seqlen, c = x.shape
    k = weight.shape[1]
    wt = weight.t().contiguous()
    dout = dout.contiguous()
    dx = torch.empty(b, seqlen, c, dtype=x.dtype)
    dwt = torch.empty(k, c, dtype=x.dtype)
    dbias = torch.empty(c, dtype=x.dtype) if bias is not None else None
    xr = _rows(x)
    library().conv_silu_bwd(
        xr.data_ptr(), xr.stride(0), wt.data_ptr(), _ptr(bias), dout.data_ptr(), dx.data_ptr(),
        dwt.data_ptr(), _ptr(dbias), b, seqlen, c, k, _threads(x.numel()),
    )  # fmt: skip
    return dx, dwt.t().contiguous(), dbias


def gated_norm_forward(y: Tensor, z: Tensor, weight: Tensor, n_groups: int, eps: float) -> Tensor:
    """RMSNorm(y * silu(z)) * weight over groups of the last dim."""
    yr, zr = _rows(y), _rows(z)
    rows, d = yr.shape
    out = torch.empty(y.shape, dtype=y.dtype)
    library().gated_norm_fwd(
        yr.data_ptr(), yr.stride(0), zr.data_ptr(), zr.stride(0), weight.contiguous().data_ptr(),
        out.data_ptr(), rows, d, d // n_groups, eps, _threads(y.numel()),
    )  # fmt: skip
    return out


def gated_norm_backward(
    y: Tensor, z: Tensor, weight: Tensor, dout: Tensor, n_groups: int, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """(dy, dz, dweight) of `gated_norm_forward`."""
    yr, zr = _rows(y), _rows(z)
    rows, d = yr.shape
    threads = _threads(y.numel())
    dout = dout.contiguous()
    dy, dz = torch.empty(y.shape, dtype=y.dtype), torch.empty(y.shape, dtype=y.dtype)
    dweight, partial = torch.empty(d, dtype=y.dtype), torch.empty(threads, d, dtype=y.dtype)
    library().gated_norm_bwd(
        yr.data_ptr(), yr.stride(0), zr.data_ptr(), zr.stride(0), weight.contiguous().data_ptr(),
        dout.data_ptr(), dy.data_ptr(), dz.data_ptr(), dweight.data_ptr(), partial.data_ptr(),
        rows, d, d // n_groups, eps, threads,
    )  # fmt: skip
    return dy, dz, dweight


def swiglu_forward(gate: Tensor, up: Tensor) -> Tensor:
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    library().swiglu_fwd(gate.data_ptr(), up.data_ptr(), out.data_ptr(), gate.numel(), _threads(gate.numel()))
    return out


def swiglu_backward(gate: Tensor, up: Tensor, dout: Tensor) -> tuple[Tensor, Tensor]:
    gate, up, dout = gate.contiguous(), up.contiguous(), dout.contiguous()
    dgate, dup = torch.empty_like(gate), torch.empty_like(gate)
    library().swiglu_bwd(
        gate.data_ptr(),
        up.data_ptr(),
        dout.data_ptr(),
        dgate.data_ptr(),
        dup.data_ptr(),
        gate.numel(),
        _threads(gate.numel()),
    )
    return dgate, dup


def rowdot(a: Tensor, b: Tensor) -> Tensor:
    """(a * b).sum(-1) without the product tensor. a, b: same shape."""
    ar, br = _rows(a), _rows(b)
    out = torch.empty(a.shape[:-1], dtype=a.dtype)
    library().rowdot(
        ar.data_ptr(),
        ar.stride(0),
        br.data_ptr(),
        br.stride(0),
        out.data_ptr(),
        ar.shape[0],
        ar.shape[1],
        _threads(a.numel()),
    )
    return out


def rms_norm_forward(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm over the last dim, times weight."""
    xr = _rows(x)
    out = torch.empty(x.shape, dtype=x.dtype)
    library().rms_norm_fwd(
        xr.data_ptr(),
        xr.stride(0),
        weight.contiguous().data_ptr(),
        out.data_ptr(),
        *xr.shape,
        eps,
        _threads(x.numel()),
    )
    return out


def rms_norm_backward(x: Tensor, weight: Tensor, dout: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(dx, dweight) of `rms_norm_forward`."""
    xr = _rows(x)
    rows, d = xr.shape
    threads = _threads(x.numel())
    dout = dout.contiguous()
    dx, dweight = torch.empty(x.shape, dtype=x.dtype), torch.empty(d, dtype=x.dtype)
    partial = torch.empty(threads, d, dtype=x.dtype)
    library().rms_norm_bwd(
        xr.data_ptr(), xr.stride(0), weight.contiguous().data_ptr(), dout.data_ptr(), dx.data_ptr(),
        dweight.data_ptr(), partial.data_ptr(), rows, d, eps, threads,
    )  # fmt: skip
    return dx, dweight


def softmax_cross_entropy_(logits: Tensor, targets: Tensor, scale: Tensor) -> Tensor:
    """Per-row cross-entropy of (rows, vocab) fp32 logits against int64 targets (< 0: ignored,
    loss 0); the logits are overwritten with scale[r] * (softmax - onehot), the gradient of
    sum(scale * loss)."""
    assert logits.is_contiguous() and targets.dtype == torch.int64
    targets, scale = targets.contiguous(), scale.float().contiguous()
    loss = torch.empty(logits.shape[0], dtype=torch.float32)
    library().softmax_xent(
        logits.data_ptr(),
        *logits.shape,
        targets.data_ptr(),
        scale.data_ptr(),
        loss.data_ptr(),
        _threads(logits.numel()),
    )
    return loss


LINEAR_ROWS = 16  # the most rows the C products take (a 16-lane vector of rows)
# F32, BF16 in kernels.c: the element types decode kernels read weight matrices and KV caches as.
ELEMENT_TYPES = {torch.float32: 0, torch.bfloat16: 1}


def linear_rows(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """x @ weight.T + bias for a few rows (at most LINEAR_ROWS) of a contiguous fp32 x (..., in) ->
    (..., out), contiguous fp32 or bf16 weight (ELEMENT_TYPES), fp32 bias. Lean on purpose: it runs
    for every projection of every decode step."""
    out_features, in_features = weight.shape
    if x.shape[-1] != in_features:  # F.linear's error, not rows read past x's end
        raise RuntimeError(
            f"mat1 and mat2 shapes cannot be multiplied ({x.shape[-1]} inputs, weight {tuple(weight.shape)})"
        )
    rows = x.numel() // in_features
    if rows > LINEAR_ROWS:  # the C code's buffers hold 16 rows: more would be read past their end
        raise ValueError(f"linear_rows: at most {LINEAR_ROWS} rows, got {rows}")
    y = torch.empty(*x.shape[:-1], out_features, dtype=x.dtype)
    library().linear_rows(
        x.data_ptr(), in_features, weight.data_ptr(), ELEMENT_TYPES[weight.dtype],
        bias.data_ptr() if bias is not None else None, y.data_ptr(), rows, out_features, in_features,
        torch.get_num_threads(),
    )  # fmt: skip
    return y


def mamba2_step(mixer, zxbcdt: Tensor, conv_state: Tensor, ssm_state: Tensor) -> Tensor:
    """A Mamba2Mixer's one-token step between in_proj and out_proj, fused: zxbcdt (b, in_proj
    width) -> (b, d_inner), advancing the contiguous fp32 conv and SSM states in place."""
    rows = zxbcdt.shape[0]
    m = mixer
    out = torch.empty(rows, m.d_inner, dtype=zxbcdt.dtype)
    weight = m.conv1d.weight.view(m.conv_dim, -1)
    scratch = torch.empty(rows + weight.shape[1], m.conv_dim, dtype=zxbcdt.dtype)  # + the taps, transposed
    bias = m.conv1d.bias
    library().mamba2_step(
        zxbcdt.data_ptr(), zxbcdt.stride(0), conv_state.data_ptr(), weight.data_ptr(),
        bias.data_ptr() if bias is not None else None, m.dt_bias.data_ptr(), m.A_log.data_ptr(),
        m.D.data_ptr(), ssm_state.data_ptr(), m.norm.weight.data_ptr(), out.data_ptr(), scratch.data_ptr(),
        rows, m.d_inner, m.n_heads, m.head_dim, m.n_groups, m.d_state, weight.shape[1], m.norm.n_groups,
        m.norm.eps, min(rows, torch.get_num_threads()),
    )  # fmt: skip
    return out


@torch.library.custom_op("mamba_slm::linear_rows", mutates_args=())
def linear_rows_op(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """`linear_rows` as a PyTorch operator, so that code compiled with torch.compile can call the
    kernel (ctypes cannot be traced). Eager code calls `linear_rows` directly: cheaper dispatch."""
    return linear_rows(x.contiguous(), weight.contiguous(), bias)


@linear_rows_op.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


ATTEND_KEYS = 64  # KEYS in kernels.c: the keys per block of attend_one's online softmax
KV_TYPES = ELEMENT_TYPES  # the KV caches' element types


def attend_one(q: Tensor, k: Tensor, v: Tensor, valid: Tensor | None = None) -> Tensor:
    """Attention of one query per head over the cached keys (a decode step): all of them, or
    those that `valid` (b, >= T) bool marks real (each row needs one).
    q: (b, h, 1, d) fp32; k, v: (b, h_kv, T, d) views of the cache, fp32 or bf16.
    Returns (b, 1, h * d) fp32."""
    b, h, _, d = q.shape
    hkv, t = k.shape[1], k.shape[2]
    out = torch.empty(b, 1, h * d, dtype=q.dtype)
    scratch = torch.empty(b * h, ATTEND_KEYS, dtype=torch.float32)
    if valid is not None:
        valid = valid.to(torch.bool).contiguous()
    library().attend_one(
        q.data_ptr(), q.stride(0), q.stride(1), k.data_ptr(), k.stride(0), k.stride(1), k.stride(2),
        v.data_ptr(), v.stride(0), v.stride(1), v.stride(2), KV_TYPES[k.dtype], _ptr(valid),
        valid.shape[1] if valid is not None else 0,
        out.data_ptr(), scratch.data_ptr(),
        b, h, hkv, t, d, d**-0.5, torch.get_num_threads() if b * h > 1 else 1,
    )  # fmt: skip
    return out


def mlp_rows(x: Tensor, norm_weight: Tensor, eps: float, gate: Tensor, up: Tensor, down: Tensor) -> Tensor:
    """x + down(silu(gate(n)) * up(n)) with n = RMSNorm(x) * norm_weight, for the few contiguous
    rows of a decode step (a block's whole MLP residual branch in one call)."""
    d, inter = x.shape[-1], gate.shape[0]
    rows = x.numel() // d
    out, normed = torch.empty_like(x), torch.empty(rows, d, dtype=x.dtype)
    g, u = torch.empty(rows, inter, dtype=x.dtype), torch.empty(rows, inter, dtype=x.dtype)
    library().mlp_rows(
        x.data_ptr(), norm_weight.data_ptr(), eps, gate.data_ptr(), up.data_ptr(), down.data_ptr(),
        ELEMENT_TYPES[gate.dtype], out.data_ptr(), normed.data_ptr(), g.data_ptr(), u.data_ptr(), rows, d, inter, torch.get_num_threads(),
    )  # fmt: skip
    return out
