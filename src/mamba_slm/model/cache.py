"""One inference cache for every layer of a hybrid model.

A Mamba layer keeps a fixed-size state (the last d_conv-1 conv inputs and the SSM state), an
attention layer keeps keys and values in preallocated buffers that grow by doubling, so a
decode step never concatenates. The cache also remembers, per row, which slots hold real
tokens (left padding never becomes a key) and the position of the next token, so RoPE and
ALiBi see each row's own positions. Rows can be reordered or selected (beam search) and one
prefilled row can be expanded into N samples without running the prompt again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import ModelConfig


@dataclass
class MambaState:
    conv: Tensor  # (b, d_conv - 1, conv_dim): the last conv inputs, oldest first
    ssm: Tensor  # mamba2: (b, h, p, n); mamba1: (b, d_inner, n)
    fused_step: bool | None = None  # whether the layer's parameters fit the fused step (checked once)


@dataclass
class KVState:
    k: Tensor  # (b, n_kv_heads, capacity, head_dim)
    v: Tensor


class HybridCache:
    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        capacity: int = 256,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        kv_dtype: torch.dtype | None = None,
    ) -> None:
        """dtype: the keys' and values' (unless kv_dtype says otherwise, e.g. bf16 to halve what
        attention layers store and read at long contexts) and the Mamba-1 states'. Mamba-2 states
        are fp32 whatever the weights' dtype: a recurrent state gathers rounding at every token
        (bf16 keeps 8 bits), and the CPU's one-call decode step reads fp32 states."""
        self.config = config
        self.seqlen = 0  # slots written so far (padding included)
        self.capacity = max(1, capacity)
        self.valid = torch.zeros(batch_size, self.capacity, dtype=torch.bool, device=device)
        self.next_pos = torch.zeros(batch_size, dtype=torch.long, device=device)
        # Whether any slot may be padding: set by the first masked pass and kept (row operations
        # only keep or repeat rows), so a decode step does not scan `valid`.
        self.padded = False
        # Decode fast-path checks on a layer's parameters, made once per cache (one generation)
        # instead of at every step: the parameters do not change in the middle of a generation.
        self.memo: dict = {}
        # With keep_trail, a pass of several tokens keeps what `rewind` needs to take some back
        # (speculative decoding's rejected draft): the CPU's one-call step leaves `states_after`,
        # which sets the Mamba states to those after the pass's first k tokens (from what it kept:
        # the states before the pass and its in_proj outputs); the module path, a `snapshot`.
        self.keep_trail = False
        self.states_after: Callable[[int], None] | None = None
        self.pass_start: tuple | None = None
        self.pass_len = 0  # tokens of the last pass
        self.layers: list[MambaState | KVState] = []
        c = config
        kv_dtype = kv_dtype or dtype
        for kind in c.layer_pattern:
            if kind == "A":
                shape = (batch_size, c.n_kv_heads, self.capacity, c.attn_head_dim)
                self.layers.append(
                    KVState(
                        torch.zeros(shape, device=device, dtype=kv_dtype),
                        torch.zeros(shape, device=device, dtype=kv_dtype),
                    )
                )
            elif c.mixer == "mamba2":
                conv_dim = c.d_inner + 2 * c.n_groups * c.d_state
                f32 = torch.float32
                self.layers.append(
                    MambaState(
                        torch.zeros(batch_size, c.d_conv - 1, conv_dim, device=device, dtype=f32),
                        torch.zeros(
                            batch_size, c.n_ssm_heads, c.head_dim, c.d_state, device=device, dtype=f32
                        ),
                    )
                )
            else:
                self.layers.append(
                    MambaState(
                        torch.zeros(batch_size, c.d_conv - 1, c.d_inner, device=device, dtype=dtype),
                        torch.zeros(batch_size, c.d_inner, c.d_state, device=device, dtype=dtype),
                    )
                )

    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]

    # ------------------------------------------------------------------ per forward pass
    def begin(self, new_len: int, mask: Tensor | None) -> Tensor:
        """Reserve slots for `new_len` tokens; returns their positions (b, new_len)."""
        self._ensure_capacity(self.seqlen + new_len)
        self.states_after = self.pass_start = None  # from the pass before: no longer of use
        self.pass_len = new_len
        sl = slice(self.seqlen, self.seqlen + new_len)
        if mask is None:
            self.valid[:, sl] = True
            positions = self.next_pos[:, None] + torch.arange(new_len, device=self.valid.device)
        else:
            self.valid[:, sl] = mask
            self.padded = True
            positions = (self.next_pos[:, None] + mask.long().cumsum(1) - 1).clamp_min(0)
        return positions

    def end(self, new_len: int) -> None:
        sl = slice(self.seqlen, self.seqlen + new_len)
        self.next_pos += self.valid[:, sl].sum(1)
        self.seqlen += new_len

    def append_kv(self, layer_idx: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write new keys/values (b, hkv, l, hd) after the used slots; returns all of them so far."""
        state = self.layers[layer_idx]
        end = self.seqlen + k.shape[2]
        state.k[:, :, self.seqlen : end] = k
        state.v[:, :, self.seqlen : end] = v
        return state.k[:, :, :end], state.v[:, :, :end]

    def key_valid(self, new_len: int) -> Tensor:
        return self.valid[:, : self.seqlen + new_len]

    def has_padding(self, new_len: int) -> bool:
        return self.padded and not bool(self.key_valid(new_len).all())

    # ------------------------------------------------------------------ taking tokens back
    def rewind(self, n: int) -> bool:
        """Forget the last n tokens of the last pass (of more than n tokens, run with keep_trail).
        True: done, the Mamba states are those after the pass's first len - n tokens.
        False: the pass took the module path, which keeps only a snapshot: the cache went back to
        before the pass and the caller runs its first len - n tokens again."""
        if not 0 < n < self.pass_len:
            raise ValueError(
                f"rewind: expected 1 to {self.pass_len - 1} tokens (the last pass's less one), got {n}"
            )
        if self.states_after is not None:
            self.states_after(self.pass_len - n)
            self._forget(self.seqlen - n)
            return True
        if self.pass_start is None:
            raise ValueError(f"rewind: the last pass kept nothing to take {n} tokens back with")
        self.restore(self.pass_start)
        return False

    def snapshot(self) -> tuple:
        """What `restore` needs to return here: the position and the Mamba states (copied); the
        keys and values stay, later slots are only hidden."""
        mamba = [(s.conv.clone(), s.ssm.clone()) if isinstance(s, MambaState) else None for s in self.layers]
        return self.seqlen, mamba

    def restore(self, snapshot: tuple) -> None:
        seqlen, mamba = snapshot
        for state, saved in zip(self.layers, mamba, strict=True):
            if saved is not None:
                state.conv.copy_(saved[0])
                state.ssm.copy_(saved[1])
        self._forget(seqlen)

    def _forget(self, seqlen: int) -> None:
        """Slots from `seqlen` on no longer hold tokens."""
        dropped = self.valid[:, seqlen : self.seqlen]
        self.next_pos -= dropped.sum(1)
        dropped.fill_(False)
        self.seqlen = seqlen
        self.states_after = self.pass_start = None
        self.pass_len = 0

    # ------------------------------------------------------------------ row operations
    def select_rows(self, index: Tensor) -> HybridCache:
        """Keep (and reorder, or repeat) rows by `index`, in place; used by beam search."""
        index = index.to(self.valid.device)
        self.states_after = self.pass_start = None  # they are of the rows before
        self.pass_len = 0
        self.valid = self.valid.index_select(0, index)
        self.next_pos = self.next_pos.index_select(0, index)
        for state in self.layers:
            if isinstance(state, KVState):
                state.k = state.k.index_select(0, index)
                state.v = state.v.index_select(0, index)
            else:
                state.conv = state.conv.index_select(0, index)
                state.ssm = state.ssm.index_select(0, index)
        return self

    def expand_rows(self, n: int) -> HybridCache:
        """Repeat each row n times (row i becomes rows i*n .. i*n+n-1): N samples from one prefill."""
        index = torch.arange(self.batch_size, device=self.valid.device).repeat_interleave(n)
        return self.select_rows(index)

    # ------------------------------------------------------------------ storage
    def _ensure_capacity(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        new_cap = max(needed, 2 * self.capacity)
        grow = new_cap - self.capacity
        self.valid = torch.nn.functional.pad(self.valid, (0, grow))
        for state in self.layers:
            if isinstance(state, KVState):
                state.k = torch.nn.functional.pad(state.k, (0, 0, 0, grow))
                state.v = torch.nn.functional.pad(state.v, (0, 0, 0, grow))
        self.capacity = new_cap
