"""ModelConfig: presets, derived fields, and clear errors for wrong types and impossible values."""

import dataclasses
import re

import pytest

from mamba_slm import ConfigError, ModelConfig
from mamba_slm.config import _FIELD_CHECKS, TOKEN_ID_FIELDS


def test_attn_ratio_spreads_attention_evenly():
    assert ModelConfig(n_layers=8, attn_ratio=0.25).layer_pattern == "MMAMMMAM"
    assert ModelConfig(n_layers=4, attn_ratio=0.3).layer_pattern == "MMAM"
    assert ModelConfig(n_layers=3, attn_ratio=0.0).layer_pattern == "MMM"
    assert ModelConfig(n_layers=10, attn_ratio=0.3).layer_pattern.count("A") == 3


def test_layer_pattern_sets_n_layers_and_presets():
    cfg = ModelConfig.from_preset("tiny", vocab_size=512, layer_pattern="mmaam")
    assert (cfg.n_layers, cfg.layer_pattern, cfg.vocab_size) == (5, "MMAAM", 512)
    small = ModelConfig.from_preset("small")
    assert (small.d_model, small.n_layers) == (256, 4)
    assert ModelConfig.from_preset("base").d_model == 768


def test_derived_defaults():
    cfg = ModelConfig(d_model=512, mixer="mamba1")
    assert cfg.d_state == 16 and cfg.dt_rank == 32 and cfg.n_kv_heads == cfg.n_heads
    assert cfg.d_intermediate % 64 == 0 and cfg.d_intermediate >= 8 * 512 / 3
    assert ModelConfig().d_state == 64


def test_round_trip_dict():
    cfg = ModelConfig.from_preset("tiny", rope_scaling={"type": "yarn", "factor": 2.0})
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(d_model=0), "d_model"),
        (dict(vocab_size=-3), "vocab_size"),
        (dict(mixer="lstm"), "mixer"),
        (dict(layer_pattern="MXA"), "layer_pattern"),
        (dict(layer_pattern=""), "layer_pattern"),
        (dict(attn_ratio=1.5), "attn_ratio"),
        (dict(d_model=96, head_dim=32, n_heads=5, layer_pattern="MA"), "n_heads"),
        (dict(n_heads=8, n_kv_heads=3, layer_pattern="MA"), "n_kv_heads"),
        (dict(d_model=80, head_dim=64), "head_dim"),
        (dict(n_groups=3), "n_groups"),
        (dict(pos_encoding="sinusoid"), "pos_encoding"),
        (dict(rope_scaling={"type": "magic"}, layer_pattern="MA"), "rope_scaling"),
        (dict(rope_scaling={"type": "linear", "factor": 0.5}, layer_pattern="MA"), "rope_scaling.factor"),
        (dict(sliding_window=0), "sliding_window"),
        (dict(d_intermediate=-1), "d_intermediate"),
    ],
)
def test_bad_values_raise_clear_errors(kwargs, field):
    with pytest.raises(ConfigError, match=rf"ModelConfig\.{field}"):
        ModelConfig(**kwargs)


def test_unknown_preset_and_field():
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        ModelConfig.from_preset("huge")
    with pytest.raises(ConfigError, match="unknown fields"):
        ModelConfig.from_dict({"d_model": 64, "colour": "red"})


# Wrong types and ranges as a hand-edited config.json has them: each field is named, with what was expected.
@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("initializer_range", "0.02", "a positive number"),
        ("rope_theta", "10000", "a positive number"),
        ("norm_eps", "1e-5", "a positive number"),
        ("norm_eps", 0.0, "a positive number"),
        ("norm_eps", float("nan"), "a positive number"),
        ("rope_theta", float("inf"), "a positive number"),
        ("dt_min", "0.001", "a positive number"),
        ("dt_max", True, "a positive number"),
        ("attn_ratio", "0.3", "a number in"),
        ("tie_embeddings", "false", "a bool"),
        ("tie_embeddings", 0, "a bool"),
        ("sliding_window", 0.5, "a positive int or None"),
        ("sliding_window", True, "a positive int or None"),
        ("d_state", 16.0, "a positive int or None"),
        ("dt_rank", 4.0, "a positive int or None"),
        ("n_kv_heads", "2", "a positive int or None"),
        ("d_intermediate", 128.0, "an int >= 0 or None"),
        ("max_position_embeddings", "512", "a positive int"),
        ("n_layers", 0, "a positive int"),
        ("vocab_size", True, "a positive int"),
        ("layer_pattern", ["M", "A"], "a non-empty string"),
        ("mixer", ["mamba2"], "one of"),
        ("pos_encoding", None, "one of"),
        ("rope_scaling", "yarn", "a dict with 'type'"),
        ("extra", [], "a dict"),
        ("extra", None, "a dict"),
        ("eos_token_id", -5, r"an int in \[0, vocab_size=256\) or None"),
        ("bos_token_id", "1", "an int in"),
        ("pad_token_id", 256, "an int in"),
        ("pad_token_id", 1.0, "an int in"),
        ("eos_token_id", False, "an int in"),
    ],
)
def test_wrong_types_and_ranges_name_the_field(field, value, expected):
    message = rf"^ModelConfig\.{field}: expected {expected}.*, got {re.escape(repr(value))}$"
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_preset("tiny", **{field: value})


@pytest.mark.parametrize(
    "scaling, key",
    [
        ({"type": "linear", "factor": "4"}, "factor"),
        ({"type": "linear", "factor": True}, "factor"),
        ({"type": "yarn", "factor": 2.0, "beta_fast": "32"}, "beta_fast"),
        (
            {"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 0},
            "original_max_position_embeddings",
        ),
    ],
)
def test_rope_scaling_entries_are_checked(scaling, key):
    with pytest.raises(ConfigError, match=rf"ModelConfig\.rope_scaling\.{key}: expected"):
        ModelConfig.from_preset("tiny", rope_scaling=scaling)


def test_every_field_is_checked_and_good_values_pass():
    assert set(_FIELD_CHECKS) | set(TOKEN_ID_FIELDS) == {f.name for f in dataclasses.fields(ModelConfig)}
    cfg = ModelConfig.from_preset(
        "tiny", rope_theta=500000, norm_eps=1e-6, initializer_range=1, dt_min=0.01, attn_ratio=1,
        tie_embeddings=False, sliding_window=32, bos_token_id=0, eos_token_id=255, pad_token_id=None,
        rope_scaling={"type": "yarn", "factor": 4, "original_max_position_embeddings": 128, "beta_fast": 16},
        extra={"note": "x"},
    )  # fmt: skip
    assert (cfg.rope_theta, cfg.eos_token_id, cfg.tie_embeddings) == (500000, 255, False)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
