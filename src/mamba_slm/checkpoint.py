"""Save and load a model directory: `config.json`, `model.safetensors`, `generation_config.json`.

Every file is written to a temporary name in the same directory and renamed into place, so a
crash never leaves a half-written file under the final name. Weights are safetensors only
(nothing is unpickled). Loading checks the directory before touching the weights and reports
a missing, corrupt or mismatched checkpoint as a one-line `CheckpointError`.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import __version__
from .config import ConfigError, ModelConfig
from .model.hybrid import HybridLM

MODEL_TYPE = "mamba_slm"
ARCHITECTURE = "MambaSLMForCausalLM"
CONFIG_NAME, WEIGHTS_NAME, GENERATION_CONFIG_NAME = (
    "config.json",
    "model.safetensors",
    "generation_config.json",
)


class CheckpointError(ValueError):
    """A model directory that cannot be loaded or written; the message names the file."""


def atomic_write(path: str | Path, write: Any) -> None:
    """Call `write(tmp_path)` then rename tmp_path to `path` (same directory, so the rename is atomic)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, data: dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2) + "\n"))


def config_to_json(config: ModelConfig) -> dict[str, Any]:
    data = {"model_type": MODEL_TYPE, "architectures": [ARCHITECTURE], "mamba_slm_version": __version__}
    data.update(config.to_dict())
    data["tie_word_embeddings"] = config.tie_embeddings  # the name transformers reads
    return data


def config_from_json(data: dict[str, Any]) -> ModelConfig:
    fields = {k: v for k, v in data.items() if k in ModelConfig.__dataclass_fields__}
    config = ModelConfig.from_dict(fields)
    # transformers reads tie_word_embeddings, the core tie_embeddings: they must not disagree.
    tied = data.get("tie_word_embeddings", config.tie_embeddings)
    if tied is not config.tie_embeddings:
        raise ConfigError(
            f"tie_word_embeddings: expected {config.tie_embeddings!r} (the same as tie_embeddings), got {tied!r}"
        )
    return config


def generation_config_json(config: ModelConfig) -> dict[str, Any]:
    data: dict[str, Any] = {"max_new_tokens": 256, "do_sample": True, "temperature": 0.8, "top_p": 0.95}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(config, key) is not None:
            data[key] = getattr(config, key)
    return data


def save_model(model: HybridLM, path: str | Path, generation_config: dict[str, Any] | None = None) -> Path:
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot create the model directory ({e.strerror})") from None
    if not os.access(path, os.W_OK):
        raise CheckpointError(f"{path}: the model directory is not writable")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)  # shared with embed_tokens.weight; safetensors stores it once
    atomic_write(path / WEIGHTS_NAME, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    atomic_write_json(
        path / GENERATION_CONFIG_NAME, generation_config or generation_config_json(model.config)
    )
    atomic_write_json(
        path / CONFIG_NAME, config_to_json(model.config)
    )  # last: its presence marks a complete dir
    return path


def load_config(path: str | Path) -> ModelConfig:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such model directory")
    if not path.is_dir():
        raise CheckpointError(f"{path}: expected a model directory, found a file")
    config_file = path / CONFIG_NAME
    if not config_file.exists():
        raise CheckpointError(f"{config_file}: missing; is {path} a model directory written by mamba-slm?")
    try:
        data = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{config_file}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or data.get("model_type") != MODEL_TYPE:
        found = data.get("model_type") if isinstance(data, dict) else type(data).__name__
        raise CheckpointError(f"{config_file}: model_type is {found!r}, expected {MODEL_TYPE!r}")
    try:
        return config_from_json(data)
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{config_file}: {e}") from None


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    weights = Path(path) / WEIGHTS_NAME
    if not weights.exists():
        raise CheckpointError(f"{weights}: missing")
    try:
        state = load_file(weights)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights}: corrupt or unreadable safetensors file ({e})") from None
    # Checkpoints written through the transformers wrapper carry a "model." prefix.
    if state and all(k.startswith("model.") for k in state):
        state = {k[len("model.") :]: v for k, v in state.items()}
    return state


def load_model(
    path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> HybridLM:
    config = load_config(path)
    state = load_state_dict(path)
    model = HybridLM(config)
    expected = model.state_dict()
    if config.tie_embeddings:
        expected.pop("lm_head.weight", None)
        state.pop("lm_head.weight", None)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{Path(path) / WEIGHTS_NAME}: does not match config.json (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]})"
        )
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise CheckpointError(
                f"{Path(path) / WEIGHTS_NAME}: {key} has shape {tuple(tensor.shape)}, config.json implies "
                f"{tuple(expected[key].shape)}"
            )
    model.load_state_dict(state, strict=False)
    return model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
