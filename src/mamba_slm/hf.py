"""Hugging Face transformers adapter: config, model and `generate()` over the core `HybridLM`.

No model logic lives here. `MambaSLMForCausalLM` holds a `HybridLM` as `self.model` and passes
calls through; our `HybridCache` travels through `generate()` under transformers' `cache`
keyword (the v5 API; tested with transformers 5.24). Importing `mamba_slm` registers both
classes, so `AutoConfig` / `AutoModelForCausalLM.from_pretrained(dir)` load a mamba-slm model
directory and `model.generate()` does greedy, sampling and beam search. A directory written by
this wrapper (keys prefixed "model.") loads in the core too.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

from .checkpoint import MODEL_TYPE
from .config import ModelConfig
from .model.cache import HybridCache
from .model.hybrid import HybridLM

_FIELDS = [f.name for f in fields(ModelConfig)]


class MambaSLMConfig(PretrainedConfig):
    model_type = MODEL_TYPE

    def __init__(self, **kwargs: Any) -> None:
        values = {k: kwargs.pop(k) for k in list(kwargs) if k in _FIELDS}
        resolved = ModelConfig(**values)  # validates and fills derived fields
        kwargs.setdefault("tie_word_embeddings", resolved.tie_embeddings)
        super().__init__(**kwargs)
        for key, value in resolved.to_dict().items():
            setattr(self, key, value)

    # transformers turns `rope_scaling` into its own `rope_parameters`; ours keeps its own meaning.
    @property
    def rope_scaling(self) -> dict[str, Any] | None:
        return self.__dict__.get("mamba_rope_scaling")

    @rope_scaling.setter
    def rope_scaling(self, value: dict[str, Any] | None) -> None:
        self.__dict__["mamba_rope_scaling"] = value

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data["rope_scaling"] = data.pop("mamba_rope_scaling", None)
        return data

    def to_model_config(self) -> ModelConfig:
        return ModelConfig(**{k: getattr(self, k) for k in _FIELDS})

    @classmethod
    def from_model_config(cls, config: ModelConfig) -> MambaSLMConfig:
        return cls(**config.to_dict())


@dataclass
class MambaSLMOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: HybridCache | None = None


class MambaSLMForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = MambaSLMConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _is_stateful = True  # recurrent state: no assisted decoding / cache cropping

    def __init__(self, config: MambaSLMConfig, core: HybridLM | None = None) -> None:
        super().__init__(config)
        self.model = core if core is not None else HybridLM(config.to_model_config())
        if config.tie_embeddings:
            self._tied_weights_keys = {"model.lm_head.weight": "model.embed_tokens.weight"}
        self.post_init()

    @classmethod
    def from_core(cls, core: HybridLM) -> MambaSLMForCausalLM:
        """Wrap an existing core model (shares its parameters)."""
        return cls(MambaSLMConfig.from_model_config(core.config), core=core)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # we bring our own cache, created in prepare_inputs_for_generation

    def _init_weights(self, module: torch.nn.Module) -> None:
        if isinstance(module, HybridLM):  # weights not in a checkpoint get the core's own init
            module.reset_parameters()

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: torch.nn.Module) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.model.lm_head

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        cache: HybridCache | None = None,
        num_logits_to_keep: int = 0,
        logits_to_keep: int = 0,
        **kwargs: Any,
    ) -> MambaSLMOutput:
        out = self.model(
            input_ids,
            attention_mask=attention_mask,
            labels=labels,
            cache=cache,
            num_logits_to_keep=num_logits_to_keep or logits_to_keep,
        )
        return MambaSLMOutput(loss=out.loss, logits=out.logits, cache=out.cache)

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.Tensor,
        cache: HybridCache | None = None,
        attention_mask: torch.Tensor | None = None,
        use_cache: bool = True,
        **kwargs: Any,
    ) -> dict[str, Any]:
        if not use_cache:
            return {"input_ids": input_ids, "attention_mask": attention_mask, "num_logits_to_keep": 1}
        if cache is None or cache.seqlen == 0:  # first call: one parallel prefill of the prompt
            if cache is None:
                cache = self.model.allocate_cache(input_ids.shape[0], capacity=input_ids.shape[1] + 64)
            return {
                "input_ids": input_ids,
                "attention_mask": attention_mask,
                "cache": cache,
                "num_logits_to_keep": 1,
            }
        return {"input_ids": input_ids[:, cache.seqlen :], "cache": cache, "num_logits_to_keep": 1}

    def _reorder_cache(self, cache: HybridCache, beam_idx: torch.Tensor) -> HybridCache:
        return cache.select_rows(beam_idx)


AutoConfig.register(MODEL_TYPE, MambaSLMConfig, exist_ok=True)
AutoModelForCausalLM.register(MambaSLMConfig, MambaSLMForCausalLM, exist_ok=True)
