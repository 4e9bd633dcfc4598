"""Model configuration: one dataclass, a few presets, derived fields and validation.

`ModelConfig` is the single source of truth for a model's shape. Everything that can be
derived (the layer pattern from `attn_ratio`, the MLP width, the number of SSM heads) is
derived in `__post_init__`, so a saved `config.json` always holds the resolved values and
loading it reproduces the same model. Impossible values raise `ConfigError` naming the field.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

MIXERS = ("mamba2", "mamba1")
POS_ENCODINGS = ("rope", "alibi", "none")
ROPE_SCALINGS = ("linear", "ntk", "yarn")


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
        self._check_positive("vocab_size", "d_model", "d_conv", "expand", "head_dim", "n_groups")
        self._check_positive("chunk_size", "n_heads", "max_position_embeddings")
        if self.mixer not in MIXERS:
            raise ConfigError(f"ModelConfig.mixer: expected one of {MIXERS}, got {self.mixer!r}")
        if self.pos_encoding not in POS_ENCODINGS:
            raise ConfigError(
                f"ModelConfig.pos_encoding: expected one of {POS_ENCODINGS}, got {self.pos_encoding!r}"
            )
        self._resolve_layer_pattern()
        if self.d_state is None:
            self.d_state = 64 if self.mixer == "mamba2" else 16
        if self.dt_rank is None:
            self.dt_rank = math.ceil(self.d_model / 16)
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.d_intermediate is None:
            self.d_intermediate = 64 * math.ceil(8 * self.d_model / 3 / 64)
        self._check_positive("d_state", "dt_rank", "n_kv_heads")
        if self.d_intermediate < 0:
            raise ConfigError(f"ModelConfig.d_intermediate: expected >= 0, got {self.d_intermediate}")
        if not 0 < self.dt_min <= self.dt_max:
            raise ConfigError(f"ModelConfig.dt_min/dt_max: expected 0 < dt_min <= dt_max, got {self.dt_min}")
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
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ConfigError(
                f"ModelConfig.sliding_window: expected a positive int, got {self.sliding_window}"
            )

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
    def _check_positive(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"ModelConfig.{name}: expected a positive int, got {value!r}")

    def _resolve_layer_pattern(self) -> None:
        if self.layer_pattern is not None:
            pattern = str(self.layer_pattern).upper()
            if not pattern or set(pattern) - {"M", "A"}:
                raise ConfigError(
                    f"ModelConfig.layer_pattern: expected a non-empty string of 'M' (Mamba) and 'A' "
                    f"(attention), got {self.layer_pattern!r}"
                )
            self.layer_pattern = pattern
            self.n_layers = len(pattern)
            return
        self._check_positive("n_layers")
        if not 0.0 <= self.attn_ratio <= 1.0:
            raise ConfigError(f"ModelConfig.attn_ratio: expected a value in [0, 1], got {self.attn_ratio}")
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
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("type") if isinstance(self.rope_scaling, dict) else None
            if kind not in ROPE_SCALINGS:
                raise ConfigError(
                    f"ModelConfig.rope_scaling: expected a dict with 'type' in {ROPE_SCALINGS}, got "
                    f"{self.rope_scaling!r}"
                )
            factor = self.rope_scaling.get("factor", 1.0)
            if not isinstance(factor, (int, float)) or factor < 1.0:
                raise ConfigError(f"ModelConfig.rope_scaling.factor: expected a number >= 1, got {factor!r}")

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
