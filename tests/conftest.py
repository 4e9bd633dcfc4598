import shutil

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny model with a byte-level BPE tokenizer (what `train` writes), for CLI tests."""
    from mamba_slm import HybridLM, ModelConfig
    from mamba_slm.tokenizer import train_tokenizer

    path = tmp_path_factory.mktemp("tiny_model")
    texts = ["To be, or not to be, that is the question. " * 3, "Café, naïve — 東京 ☃. Hello there! " * 3]
    tokenizer = train_tokenizer(texts, vocab_size=320, output_dir=path)
    torch.manual_seed(0)
    config = ModelConfig.from_preset("tiny", vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                                     bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    HybridLM(config).save_pretrained(path)
    return path


NEEDS_C_COMPILER = pytest.mark.skipif(
    shutil.which("gcc") is None and shutil.which("cc") is None, reason="no C compiler to build the kernels"
)


@pytest.fixture(params=[pytest.param("c-kernels", marks=NEEDS_C_COMPILER), "pytorch"])
def kernel_backend(request, monkeypatch):
    """Run a test on both paths of the fused ops: the compiled CPU kernels (at every size) and
    the PyTorch fallback. (tests/test_kernels.py checks that the kernels build where a compiler is.)"""
    from mamba_slm.model import kernels

    if request.param == "pytorch":
        monkeypatch.setattr(kernels, "library", lambda: None)
        monkeypatch.setattr(kernels, "loaded", False)
    else:
        monkeypatch.setattr(kernels, "MIN_ELEMENTS", 0)
    return request.param
