"""ModelConfig: presets, derived fields, and clear errors for impossible values."""

import pytest

from mamba_slm import ConfigError, ModelConfig


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
