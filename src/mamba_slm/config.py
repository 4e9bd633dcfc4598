"""Model configuration: one dataclass, a few presets, derived fields and validation.

`ModelConfig` is the single source of truth for a model's shape. Everything that can be
derived (the layer pattern from `attn_ratio`, the MLP width, the number of SSM heads) is
derived in `__post_init__`, so a saved `config.json` always holds the resolved values and
loading it reproduces the same model. A value of the wrong type or out of range raises
`ConfigError` naming the field and what was expected.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

MIXERS = ("mamba2", "mamba1")
POS_ENCODINGS = ("rope", "alibi", "none")
ROPE_SCALINGS = ("linear", "ntk", "yarn")
TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """An int or a finite float (JSON also allows NaN and Infinity; neither is a usable setting)."""
    return _is_int(value) or (isinstance(value, float) and math.isfinite(value))


_POSITIVE_INT = (lambda v: _is_int(v) and v > 0, "a positive int")
_POSITIVE_NUMBER = (lambda v: _is_number(v) and v > 0, "a positive number")

# The type and range of every field except the token ids (checked against vocab_size): a check
# and what was expected. Fields listed in _OPTIONAL also accept None ("derive the default" or
# "unset"). Checks that relate several fields come after these, in __post_init__.
_FIELD_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "vocab_size": _POSITIVE_INT,
    "d_model": _POSITIVE_INT,
    "n_layers": _POSITIVE_INT,
    "layer_pattern": (
        lambda v: isinstance(v, str) and v != "" and set(v.upper()) <= {"M", "A"},
        "a non-empty string of 'M' (Mamba) and 'A' (attention)",
    ),
    "attn_ratio": (lambda v: _is_number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "mixer": (lambda v: isinstance(v, str) and v in MIXERS, f"one of {MIXERS}"),
    "d_state": _POSITIVE_INT,
    "d_conv": _POSITIVE_INT,
    "expand": _POSITIVE_INT,
    "head_dim": _POSITIVE_INT,
    "n_groups": _POSITIVE_INT,
    "chunk_size": _POSITIVE_INT,
    "dt_rank": _POSITIVE_INT,
    "dt_min": _POSITIVE_NUMBER,
    "dt_max": _POSITIVE_NUMBER,
    "n_heads": _POSITIVE_INT,
    "n_kv_heads": _POSITIVE_INT,
    "pos_encoding": (lambda v: isinstance(v, str) and v in POS_ENCODINGS, f"one of {POS_ENCODINGS}"),
    "rope_theta": _POSITIVE_NUMBER,
    "rope_scaling": (
        lambda v: isinstance(v, dict) and v.get("type") in ROPE_SCALINGS,
        f"a dict with 'type' in {ROPE_SCALINGS}",
    ),
    "sliding_window": _POSITIVE_INT,
    "max_position_embeddings": _POSITIVE_INT,
    "d_intermediate": (lambda v: _is_int(v) and v >= 0, "an int >= 0"),
    "tie_embeddings": (lambda v: isinstance(v, bool), "a bool (true or false)"),
    "norm_eps": _POSITIVE_NUMBER,
    "initializer_range": _POSITIVE_NUMBER,
    "extra": (lambda v: isinstance(v, dict), "a dict"),
}
_OPTIONAL = {
    "layer_pattern", "d_state", "dt_rank", "n_kv_heads", "rope_scaling", "sliding_window", "d_intermediate",
}  # fmt: skip
# rope_scaling entries besides "type" (the ones attention.rope_inv_freq reads), with their checks.
_ROPE_SCALING_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "factor": (lambda v: _is_number(v) and v >= 1, "a number >= 1"),
    "original_max_position_embeddings": _POSITIVE_NUMBER,
    "beta_fast": _POSITIVE_NUMBER,
    "beta_slow": _POSITIVE_NUMBER,
}


class ConfigError(ValueError):
    """A model configuration that cannot be built; the message names the field."""


@dataclass
class ModelConfig:
    vocab_size: int = 8192
    d_model: int = 256
    n_layers: int = 4
    # Layer mix: an explicit pattern ("MMAM": M = Mamba, A = attention) wins over attn_ratio.
    layer_pattern: str | None = None
    attn_ratio: float = 0.3
    # Mamba mixer
    mixer: str = "mamba2"
    d_state: int | None = None  # default: 64 for mamba2, 16 for mamba1
    d_conv: int = 4
    expand: int = 2
    head_dim: int = 64  # Mamba-2 head size P
    n_groups: int = 1  # Mamba-2 B/C groups
    chunk_size: int = 64
    dt_rank: int | None = None  # Mamba-1; default ceil(d_model / 16)
    dt_min: float = 0.001
    dt_max: float = 0.1
    # Attention
    n_heads: int = 8
    n_kv_heads: int | None = None  # default: n_heads (no grouping)
    pos_encoding: str = "rope"
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"type": linear|ntk|yarn, "factor": s, ...}
    sliding_window: int | None = None
    max_position_embeddings: int = 2048
    # MLP (SwiGLU) after every mixer; 0 disables it
    d_intermediate: int | None = None  # default: 8/3 d_model rounded up to a multiple of 64
    tie_embeddings: bool = True
    norm_eps: float = 1e-5
    initializer_range: float = 0.02
    # Special tokens (set from the tokenizer)
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._check_fields()
        self._resolve_layer_pattern()
        if self.d_state is None:
            self.d_state = 64 if self.mixer == "mamba2" else 16
        if self.dt_rank is None:
            self.dt_rank = math.ceil(self.d_model / 16)
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.d_intermediate is None:
            self.d_intermediate = 64 * math.ceil(8 * self.d_model / 3 / 64)
        if not self.dt_min <= self.dt_max:
            raise ConfigError(
                f"ModelConfig.dt_min/dt_max: expected dt_min <= dt_max, got {self.dt_min} > {self.dt_max}"
            )
        if self.mixer == "mamba2":
            if self.d_inner % self.head_dim:
                raise ConfigError(
                    f"ModelConfig.head_dim: expand*d_model={self.d_inner} is not divisible by head_dim="
                    f"{self.head_dim}"
                )
            if self.n_ssm_heads % self.n_groups:
                raise ConfigError(
                    f"ModelConfig.n_groups: {self.n_ssm_heads} SSM heads are not divisible by n_groups="
                    f"{self.n_groups}"
                )
        if "A" in self.layer_pattern:
            self._validate_attention()

    # ----------------------------------------------------------------- derived values
    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def n_ssm_heads(self) -> int:
        return self.d_inner // self.head_dim

    @property
    def attn_head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def attention_layers(self) -> list[int]:
        return [i for i, c in enumerate(self.layer_pattern) if c == "A"]

    # ----------------------------------------------------------------- validation helpers
    def _check_fields(self) -> None:
        """The type and range of every field on its own, in declaration order."""
        for name, (check, expected) in _FIELD_CHECKS.items():
            value = getattr(self, name)
            if name in _OPTIONAL:
                if value is None:
                    continue
                expected += " or None"
            if not check(value):
                raise ConfigError(f"ModelConfig.{name}: expected {expected}, got {value!r}")
        scaling = self.rope_scaling or {}
        for key, (check, expected) in _ROPE_SCALING_CHECKS.items():
            if key in scaling and not check(scaling[key]):
                raise ConfigError(
                    f"ModelConfig.rope_scaling.{key}: expected {expected}, got {scaling[key]!r}"
                )
        for name in TOKEN_ID_FIELDS:
            value = getattr(self, name)
            if value is not None and not (_is_int(value) and 0 <= value < self.vocab_size):
                raise ConfigError(
                    f"ModelConfig.{name}: expected an int in [0, vocab_size={self.vocab_size}) or None, "
                    f"got {value!r}"
                )

    def _resolve_layer_pattern(self) -> None:
        if self.layer_pattern is not None:  # its characters are checked in _check_fields
            self.layer_pattern = self.layer_pattern.upper()
            self.n_layers = len(self.layer_pattern)
            return
        n_attn = round(self.attn_ratio * self.n_layers)
        if self.attn_ratio > 0 and n_attn == 0:
            n_attn = 1
        # Spread attention evenly: the middle of each of n_attn equal spans of layers.
        attn = {int((i + 0.5) * self.n_layers / n_attn) for i in range(n_attn)}
        self.layer_pattern = "".join("A" if i in attn else "M" for i in range(self.n_layers))

    def _validate_attention(self) -> None:
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"ModelConfig.n_heads: d_model={self.d_model} is not divisible by n_heads={self.n_heads}"
            )
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"ModelConfig.n_kv_heads: n_heads={self.n_heads} is not divisible by n_kv_heads="
                f"{self.n_kv_heads}"
            )
        if self.pos_encoding == "rope" and self.attn_head_dim % 2:
            raise ConfigError(
                f"ModelConfig.n_heads: RoPE needs an even head size, got d_model/n_heads={self.attn_head_dim}"
            )

    # ----------------------------------------------------------------- presets and I/O
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}: expected one of {sorted(PRESETS)}")
        values = dict(PRESETS[name])
        if overrides.get("layer_pattern") is not None:
            values.pop("n_layers", None)
        values.update(overrides)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"ModelConfig: unknown fields {unknown}")
        return cls(**values)


PRESETS: dict[str, dict[str, Any]] = {
    # For tests: a few thousand parameters per layer, every layer kind present.
    "tiny": dict(
        vocab_size=256, d_model=64, n_layers=4, layer_pattern="MMAM", d_state=16, head_dim=16,
        chunk_size=16, n_heads=4, n_kv_heads=2, d_intermediate=128, max_position_embeddings=512,
    ),
    # The seed's model: d_model 256, 4 layers, 70/30 Mamba/attention.
    "small": dict(d_model=256, n_layers=4, attn_ratio=0.3, head_dim=64, n_heads=8, n_kv_heads=4),
    # About 100M parameters with an 8k vocabulary.
    "base": dict(d_model=768, n_layers=12, attn_ratio=0.25, head_dim=64, n_heads=12, n_kv_heads=4),
}  # fmt: skip
