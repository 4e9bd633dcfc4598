"""The hybrid language model: embedding -> blocks -> RMSNorm -> LM head.

A block is pre-norm: x + mixer(norm(x)), then x + mlp(norm(x)); the mixer is a Mamba layer
(`ssm.py`) or an attention layer (`attention.py`) as `config.layer_pattern` says, the MLP is
SwiGLU (`d_intermediate = 0` drops it). `HybridLM` is a plain `nn.Module`; `hf.py` wraps it
for the Hugging Face world.

Design choices:
  * one `forward` for training, prefill and decode: with a `HybridCache` it continues from the
    cached state (a whole prompt in one parallel pass, or one token via the recurrent step);
    with `cache.keep_trail` a pass keeps what `HybridCache.rewind` needs (speculative decoding);
  * positions come from the attention mask, so a left-padded row sees exactly what it would
    alone; RoPE cos/sin and the mask are built once per pass and shared by the layers;
  * `num_logits_to_keep` computes the LM head only where logits are needed (generation);
  * a one-token decode step on a CPU runs all blocks as one C call where it can, and so do up to
    16 tokens of one row (`fused_step.py`): a short prompt, a draft to verify;
  * init: N(0, 0.02) weights, residual output projections scaled by 1/sqrt(2 n_layers)
    (GPT-2), Mamba's own dt/A/D init; tied embeddings by default.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..config import ModelConfig
from . import fused_step, kernels
from .attention import Attention, AttentionInputs, build_attention_inputs, rope_cos_sin, rope_inv_freq
from .cache import HybridCache, MambaState
from .fused import linear_cross_entropy, rms_norm, swiglu
from .linear import MAX_ROWS, Linear
from .ssm import Mamba1Mixer, Mamba2Mixer


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


class MLP(nn.Module):
    def __init__(self, d_model: int, d_intermediate: int) -> None:
        super().__init__()
        self.gate_proj = Linear(d_model, d_intermediate, bias=False)
        self.up_proj = Linear(d_model, d_intermediate, bias=False)
        self.down_proj = Linear(d_intermediate, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.kind = config.layer_pattern[layer_idx]
        self.input_norm = RMSNorm(config.d_model, config.norm_eps)
        if self.kind == "A":
            self.mixer: nn.Module = Attention(config, layer_idx)
        elif config.mixer == "mamba2":
            self.mixer = Mamba2Mixer(config, layer_idx)
        else:
            self.mixer = Mamba1Mixer(config, layer_idx)
        self.mlp = MLP(config.d_model, config.d_intermediate) if config.d_intermediate else None
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps) if self.mlp is not None else None
        self.compiled_step = None  # set by HybridLM.compile_decode: the block's one-token step, compiled

    def forward(
        self, x: Tensor, mask: Tensor | None, attn: AttentionInputs | None, cache: HybridCache | None
    ) -> Tensor:
        if self.compiled_step is not None and cache is not None and x.shape[1] == 1:
            if self.kind == "M":
                state = cache.layers[self.mixer.layer_idx]
                return self.compiled_step(x, state.conv, state.ssm)
            project, finish = self.compiled_step  # compiled around the eager attention over the growing KV
            q, k, v = project(x, attn.cos, attn.sin)
            return finish(x, self.mixer.attend(q, k, v, attn, cache))
        h = self.input_norm(x)
        if self.kind == "A":
            h = self.mixer(h, attn, cache)
        else:
            h = self.mixer(h, mask, cache.layers[self.mixer.layer_idx] if cache is not None else None)
        return self.mlp_residual(x + h, cache)

    def mlp_residual(self, x: Tensor, cache: HybridCache | None = None) -> Tensor:
        if self.mlp is None:
            return x
        fused = self._fused_mlp_weights(x, cache)
        if fused is not None:
            return kernels.mlp_rows(x, *fused)
        return x + self.mlp(self.mlp_norm(x))

    def _fused_mlp_weights(self, x: Tensor, cache: HybridCache | None = None) -> tuple | None:
        """(norm weight, eps, gate, up, down weights) when a decode step's MLP branch can run as one
        kernel call: a few contiguous fp32 rows on a CPU, no autograd, and plain projections (a LoRA
        or quantized wrapper keeps the module path, so it is never skipped). The parameter checks
        run once per cache, that is once per generation, not at every step."""
        if (
            torch.is_grad_enabled()
            or x.numel() > MAX_ROWS * x.shape[-1]
            or x.dtype is not torch.float32
            or x.device.type != "cpu"
            or not x.is_contiguous()
            or torch.compiler.is_compiling()
        ):
            return None
        memo = cache.memo if cache is not None else {}
        key = (self, "mlp")
        if key not in memo:
            memo[key] = self._plain_mlp_weights()
        return memo[key]

    def _plain_mlp_weights(self) -> tuple | None:
        projections = (self.mlp.gate_proj, self.mlp.up_proj, self.mlp.down_proj)
        if any(type(p) is not Linear or p.bias is not None for p in projections):
            return None
        norm = self.mlp_norm
        weights = (norm.weight, *(p.weight for p in projections))
        if not (kernels.fp32_cpu(*weights) and all(w.is_contiguous() for w in weights)):
            return None
        return norm.weight, norm.eps, *weights[1:]

    def attention_project(
        self, x: Tensor, cos: Tensor | None, sin: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        return self.mixer.project(self.input_norm(x), cos, sin)

    def attention_finish(self, x: Tensor, attended: Tensor) -> Tensor:
        return self.mlp_residual(x + self.mixer.o_proj(attended))

    def mamba_step(self, x: Tensor, conv: Tensor, ssm: Tensor) -> Tensor:
        """The whole block for one token, state tensors passed explicitly (a pure function to compile)."""
        return self.mlp_residual(x + self.mixer.step(self.input_norm(x), MambaState(conv, ssm)))


@dataclass
class CausalLMOutput:
    logits: Tensor | None  # (b, l, vocab) or (b, num_logits_to_keep, vocab); None with return_logits=False
    loss: Tensor | None = None
    cache: HybridCache | None = None
    hidden_states: Tensor | None = None  # final normed hidden states, with output_hidden_states=True


class HybridLM(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = Linear(config.d_model, config.vocab_size, bias=False)
        self._rope: tuple[Tensor, float] | None = None  # computed on first use, on the input's device
        self.gradient_checkpointing = False
        self.reset_parameters()
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.config.initializer_range
        residual_std = std / math.sqrt(2 * self.config.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                is_residual_out = name.endswith(("out_proj", "o_proj", "down_proj"))
                nn.init.normal_(module.weight, 0.0, residual_std if is_residual_out else std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        for module in self.modules():
            if hasattr(module, "init_ssm_parameters"):
                module.init_ssm_parameters()

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        cache: HybridCache | None = None,
        num_logits_to_keep: int = 0,
        return_logits: bool = True,
        output_hidden_states: bool = False,
    ) -> CausalLMOutput:
        """input_ids: (b, l). attention_mask: (b, l), 1 for real tokens, 0 for (left) padding; it
        covers the new tokens only, the cache remembers earlier ones. labels: (b, l), -100 ignored.
        With labels and return_logits=False (training), the loss is computed in chunks without
        materialising the logits (out.logits is None), saving the LM head's largest tensors.
        output_hidden_states=True also returns the final normed hidden states (contrastive search)."""
        b, seqlen = input_ids.shape
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            mask = attention_mask.bool()
        if cache is not None:
            positions = cache.begin(seqlen, mask)
        elif mask is not None:
            positions = (mask.long().cumsum(1) - 1).clamp_min(0)
        else:
            positions = torch.arange(seqlen, device=input_ids.device).expand(b, seqlen)

        hidden = self.embed_tokens(input_ids)  # (b, l, d)
        attn = self._attention_inputs(positions, mask, cache, hidden.dtype)
        # The one-call step takes real new tokens only (a padding token must stay out of the
        # states): one per row, or a few of one row.
        one_call = cache is not None and mask is None and (seqlen == 1 or (b == 1 and seqlen <= MAX_ROWS))
        if not (one_call and fused_step.run(self, hidden, attn, cache)):
            if cache is not None and cache.keep_trail and seqlen > 1:
                cache.pass_start = cache.snapshot()
            for block in self.layers:
                if self.gradient_checkpointing and self.training:
                    hidden = checkpoint(block, hidden, mask, attn, cache, use_reentrant=False)
                else:
                    hidden = block(hidden, mask, attn, cache)
        if cache is not None:
            cache.end(seqlen)
        hidden = self.norm(hidden)
        if labels is not None and not return_logits:
            targets = self.shift_labels(labels, mask).reshape(-1)
            loss = linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), self.lm_head.weight, targets)
            return CausalLMOutput(logits=None, loss=loss, cache=cache)
        states = hidden if output_hidden_states else None  # all positions, whatever num_logits_to_keep
        if num_logits_to_keep:
            hidden = hidden[:, -num_logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = self.loss(logits, labels, mask)
        return CausalLMOutput(logits, loss, cache, states)

    @staticmethod
    def shift_labels(labels: Tensor, mask: Tensor | None = None) -> Tensor:
        """Targets aligned with the logits: position t predicts labels[t+1]; -100 where ignored."""
        if mask is not None:  # no loss on padding, nor on predicting from a padding position
            labels = labels.masked_fill(~mask, -100)
            labels = labels.masked_fill(~F.pad(mask[:, :-1], (1, 0), value=True), -100)
        return F.pad(labels[:, 1:], (0, 1), value=-100)

    @classmethod
    def loss(cls, logits: Tensor, labels: Tensor, mask: Tensor | None = None) -> Tensor:
        """Next-token cross-entropy (fp32); padding and -100 labels are ignored."""
        # Shift the labels, not the logits: slicing the logits would copy them (and zero-fill in backward).
        targets = cls.shift_labels(labels, mask).reshape(-1)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets, ignore_index=-100)

    def _attention_inputs(
        self, positions: Tensor, mask: Tensor | None, cache: HybridCache | None, dtype: torch.dtype
    ) -> AttentionInputs | None:
        if "A" not in self.config.layer_pattern:
            return None
        seqlen = positions.shape[1]
        offset = cache.seqlen if cache is not None else 0
        key_valid = mask
        if cache is not None:
            key_valid = cache.key_valid(seqlen) if cache.has_padding(seqlen) else None
        return build_attention_inputs(
            self.config, *self._rope_on(positions.device), positions, key_valid, offset, dtype
        )

    def _rope_on(self, device: torch.device) -> tuple[Tensor, float]:
        """RoPE's inverse frequencies on `device` and its attention factor."""
        if self._rope is None or self._rope[0].device != device:
            # Not a buffer: frameworks that build the module on the meta device would leave it empty.
            inv_freq, factor = rope_inv_freq(self.config)
            self._rope = (inv_freq.to(device), factor)
        return self._rope

    def decode_greedy(
        self,
        tokens: Tensor,
        cache: HybridCache,
        steps: int,
        stop_ids: Sequence[int] = (),
        finished: Tensor | None = None,
    ) -> Tensor | None:
        """Up to `steps` greedy decode steps in one call of the C kernels (`fused_step.greedy`): the
        rows' current tokens (b,) -> their next tokens (k, b), those of k steps of `forward` with
        an argmax each. k < steps once every row has emitted one of `stop_ids`; `finished` (b,)
        bool marks the rows that already have, and is updated. None, with nothing done, where the
        C step does not cover this model or cache: step with `forward` instead."""
        if steps < 1:
            raise ValueError(f"decode_greedy: expected at least 1 step, got {steps}")
        vocab = self.config.vocab_size
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab):
            # the C loop reads the embedding row of each token unchecked
            raise IndexError(f"decode_greedy: token ids must be in [0, {vocab}), got {tokens.tolist()}")
        window = self.config.sliding_window
        if (
            self.config.pos_encoding == "alibi"
            or (window is not None and window < cache.seqlen + steps)
            or not cache.valid.is_contiguous()
            or not fused_step.greedy_covers(self, tokens, cache)
        ):
            return None
        positions = cache.begin(steps, None)  # (b, steps); the slots are marked real
        cos = sin = None
        if self.config.pos_encoding == "rope":
            # in the model's dtype first, as forward's steps round them
            rope = rope_cos_sin(*self._rope_on(positions.device), positions, self.embed_tokens.weight.dtype)
            cos, sin = (t.transpose(0, 1).float().contiguous() for t in rope)  # (steps, b, head_dim)
        if finished is None:
            finished = torch.zeros(tokens.shape[0], dtype=torch.bool)
        chosen = fused_step.greedy(self, tokens, cache, cos, sin, stop_ids, finished, steps)
        if chosen is None:  # the slots begin() reserved are taken again by the next pass
            return None
        cache.end(chosen.shape[0])
        cache.pass_len = 0  # a greedy pass keeps no trail: nothing to take back
        return chosen

    # ------------------------------------------------------------------ conveniences
    def allocate_cache(
        self, batch_size: int, capacity: int = 256, kv_dtype: torch.dtype | None = None
    ) -> HybridCache:
        """A cache for `batch_size` rows; keys and values in `kv_dtype` (default: the model's dtype)."""
        p = self.embed_tokens.weight
        return HybridCache(
            self.config, batch_size, capacity, device=p.device, dtype=p.dtype, kv_dtype=kv_dtype
        )

    def compile_decode(self, mode: str | None = None) -> None:
        """Compile each Mamba block's one-token step with torch.compile (opt-in, for generation).

        Eager decoding spends about half of a CPU step dispatching ~40 small ops per block; the
        compiled step fuses them into a few kernels (measured here: 315 -> 150 us per block). Shapes
        are static per batch size, so a graph is compiled once per block and batch size. On CUDA,
        mode="reduce-overhead" also captures CUDA graphs. In an attention block everything but the
        attention over the growing KV cache is compiled. On a CPU with the C kernels, the default
        one-call step (`fused_step.py`) is faster than the compiled blocks; this is for GPUs."""

        def compiled(fn):
            return torch.compile(fn, mode=mode, dynamic=False)

        kernels.library()  # loaded first, so that the compiled steps call its few-row products

        for block in self.layers:
            if block.kind == "M":
                block.compiled_step = compiled(block.mamba_step)
            else:
                block.compiled_step = (compiled(block.attention_project), compiled(block.attention_finish))

    def gradient_checkpointing_enable(self) -> None:
        self.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.gradient_checkpointing = False

    def num_parameters(self, trainable_only: bool = False) -> int:
        params = {id(p): p for p in self.parameters() if p.requires_grad or not trainable_only}
        return sum(p.numel() for p in params.values())

    def save_pretrained(self, path: str | Path, **kwargs) -> None:
        from ..checkpoint import save_model

        save_model(self, path, **kwargs)

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs) -> HybridLM:
        from ..checkpoint import load_model

        return load_model(path, **kwargs)
