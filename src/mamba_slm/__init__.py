"""mamba-slm: hybrid Mamba-Transformer small language models, from a laptop CPU to GPUs."""

__version__ = "0.1.0"

from .config import ConfigError, ModelConfig  # noqa: E402
from .generation import Engine, GenerationConfig  # noqa: E402
from .model.cache import HybridCache  # noqa: E402
from .model.hybrid import CausalLMOutput, HybridLM  # noqa: E402

__all__ = ["ConfigError", "ModelConfig", "HybridCache", "HybridLM", "CausalLMOutput", "Engine", "GenerationConfig",
           "__version__"]  # fmt: skip

from . import hf as _hf  # noqa: E402,F401  (registers the transformers Auto classes)
