"""Model directories: bit-exact round trip, atomic files, one-line errors for bad directories."""

import json

import pytest
import torch

from mamba_slm import HybridLM, ModelConfig
from mamba_slm.checkpoint import CheckpointError, load_model


@pytest.mark.parametrize("overrides", [{}, {"mixer": "mamba1", "tie_embeddings": False}])
def test_save_load_is_bit_exact(tmp_path, overrides):
    model = HybridLM(ModelConfig.from_preset("tiny", **overrides))
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]
    loaded = HybridLM.from_pretrained(tmp_path)
    assert loaded.config == model.config
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    if model.config.tie_embeddings:
        assert loaded.lm_head.weight is loaded.embed_tokens.weight
    ids = torch.randint(0, 256, (1, 10))
    assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_load_to_dtype(tmp_path):
    HybridLM(ModelConfig.from_preset("tiny")).save_pretrained(tmp_path)
    assert load_model(tmp_path, dtype=torch.bfloat16).embed_tokens.weight.dtype == torch.bfloat16


def test_no_temp_files_left(tmp_path):
    HybridLM(ModelConfig.from_preset("tiny")).save_pretrained(tmp_path)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def _saved(tmp_path):
    HybridLM(ModelConfig.from_preset("tiny")).save_pretrained(tmp_path)
    return tmp_path


def test_errors_are_one_line(tmp_path):
    cases = []
    cases.append((tmp_path / "nope", "no such model directory"))
    (tmp_path / "file").write_text("x")
    cases.append((tmp_path / "file", "expected a model directory"))
    (tmp_path / "empty").mkdir()
    cases.append((tmp_path / "empty", "config.json: missing"))

    bad_json = _saved(tmp_path / "bad_json")
    (bad_json / "config.json").write_text("{not json")
    cases.append((bad_json, "not valid JSON"))

    other = _saved(tmp_path / "other")
    (other / "config.json").write_text(json.dumps({"model_type": "llama"}))
    cases.append((other, "model_type is 'llama'"))

    bad_field = _saved(tmp_path / "bad_field")
    data = json.loads((bad_field / "config.json").read_text())
    data["mixer"] = "gru"
    (bad_field / "config.json").write_text(json.dumps(data))
    cases.append((bad_field, "ModelConfig.mixer"))

    corrupt = _saved(tmp_path / "corrupt")
    (corrupt / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    cases.append((corrupt, "corrupt or unreadable"))

    truncated = _saved(tmp_path / "truncated")
    blob = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    cases.append((truncated, "corrupt or unreadable"))

    no_weights = _saved(tmp_path / "no_weights")
    (no_weights / "model.safetensors").unlink()
    cases.append((no_weights, "model.safetensors: missing"))

    mismatched = _saved(tmp_path / "mismatched")
    data = json.loads((mismatched / "config.json").read_text())
    data["d_model"] = 128
    (mismatched / "config.json").write_text(json.dumps(data))
    cases.append((mismatched, "has shape"))

    for path, message in cases:
        with pytest.raises(CheckpointError, match=message) as err:
            HybridLM.from_pretrained(path)
        assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "field, value",
    [
        ("initializer_range", "0.02"),  # used to crash building the model
        ("rope_theta", "10000"),  # used to crash in the first forward pass
        ("norm_eps", "1e-5"),
        ("tie_embeddings", "false"),  # used to be accepted (truthy: embeddings stayed tied)
        ("sliding_window", 0.5),
        ("eos_token_id", -5),
        ("tie_word_embeddings", False),  # disagrees with tie_embeddings: true
    ],
)
def test_hand_edited_config_with_wrong_type_is_one_line_error(tmp_path, field, value):
    path = _saved(tmp_path)
    data = json.loads((path / "config.json").read_text())
    data[field] = value
    (path / "config.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=rf"config\.json: (ModelConfig\.)?{field}: expected ") as err:
        load_model(path)
    assert str(err.value).startswith(str(path / "config.json"))
    assert "\n" not in str(err.value)


def test_unwritable_directory(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(CheckpointError, match="cannot create"):
        HybridLM(ModelConfig.from_preset("tiny")).save_pretrained(target / "sub")
