"""Fine-tuning: LoRA and QLoRA with PEFT on every layer type, full fine-tuning, chat SFT, merging.

Design choices:
  * PEFT's own LoRA layers replace our `nn.Linear` projections in place, applied through the
    transformers wrapper (`MambaSLMForCausalLM`, core at `.model`), so adapter keys are named as
    the wrapper names modules and `peft.PeftModel.from_pretrained(wrapper, dir)` loads them. The
    core inside is the same object, so `train.Trainer` trains it unchanged (no second loop).
  * Default targets are the projections of every layer kind: Mamba `in_proj`/`out_proj` (both
    mixers), attention `q/k/v/o_proj`, SwiGLU `gate/up/down_proj`. Each is called as a module in
    the parallel forward and in the recurrent step, so an adapter is never bypassed. The
    depthwise `conv1d`, `lm_head` and the embeddings are not targets: fused kernels read their
    weights directly, so an adapter there would be skipped silently. Unknown names are errors.
  * QLoRA: every projection becomes a bitsandbytes 4-bit NF4 `Linear4bit` (double quantization,
    bf16 compute; lm_head and embeddings stay full precision), LoRA goes on top. CUDA only: the
    CPU 4-bit path of bitsandbytes 0.50 trains, but its inference kernel (used by evaluation)
    rejects widths that are not multiples of 32, and on a CPU 4-bit only costs speed.
  * An adapter directory also holds `mamba_slm_adapter.json` (the base's config and a weight
    fingerprint), so applying it to another base fails with one line instead of silently.
  * `--merge` reloads the base in full precision and folds in the saved adapter (after QLoRA
    too: the 4-bit weights are an approximation that should not be merged into).
  * Chat SFT data (`chat_data.py`): loss on assistant tokens only, one conversation per padded row.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import (
    CONFIG_NAME,
    CheckpointError,
    atomic_write_json,
    generation_config_json,
    load_model,
    save_model,
)
from .model.hybrid import HybridLM
from .tokenizer import save_tokenizer
from .train import TrainArgs, Trainer

DEFAULT_TARGETS = ("in_proj", "out_proj", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # fmt: skip
NOT_TARGETS = {"conv1d", "lm_head", "embed_tokens"}  # their weights are read directly, not called as modules
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
ADAPTER_META = "mamba_slm_adapter.json"
TOKEN_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")


# peft imports bitsandbytes whenever it is installed; on CPUs with AVX512-BF16, bitsandbytes then
# logs a warning at import that an optional kernels package is missing: one line of noise on every
# adapter load, about a 4-bit CPU kernel that nothing here asks for.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


class FinetuneError(ValueError):
    """Fine-tuning settings, adapters or bases that do not fit; the message says which and why."""


@dataclass
class FinetuneArgs:
    base: str  # the pre-trained model directory
    train: TrainArgs  # output_dir, steps, batch size, learning rate, precision, eval, checkpoints, resume
    dataset: str | None = None  # default: the built-in `chatterbot` with chat, `shakespeare` without
    chat: bool = False  # conversations with loss on assistant tokens only
    tokenizer: str | None = None  # default: the base directory's tokenizer
    text_field: str = "text"
    dataset_config: str | None = None  # text data from the hub: its configuration, split, streaming
    split: str = "train"
    streaming: bool = False
    max_samples: int | None = None
    validation_split: float = 0.1
    max_length: int = 512  # tokens per conversation (truncated) or per packed text block
    use_lora: bool = False  # False: full fine-tuning
    qlora: bool = False  # 4-bit NF4 base + LoRA (CUDA)
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    target_modules: list[str] | None = None  # default: DEFAULT_TARGETS present in the model
    train_embeddings: bool = False  # also train the (tied) token embeddings, saved in the adapter
    merge: bool = False  # also write output_dir/merged, a full model directory

    def __post_init__(self) -> None:
        self.use_lora = self.use_lora or self.qlora
        if self.lora_r < 1:
            raise FinetuneError(f"--lora-r: expected a positive integer, got {self.lora_r}")
        if not self.lora_alpha > 0:
            raise FinetuneError(f"--lora-alpha: expected a positive number, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise FinetuneError(f"--lora-dropout: expected a value in [0, 1), got {self.lora_dropout}")
        if self.max_length < 2:
            raise FinetuneError(f"--max-length: expected at least 2, got {self.max_length}")
        if self.chat and (self.dataset_config or self.split != "train" or self.streaming):
            raise FinetuneError("--dataset-config, --split and --streaming are for text data, not --chat")
        if self.train_embeddings and not self.use_lora:
            raise FinetuneError("--train-embeddings: only with --use-lora/--qlora (full fine-tuning trains them anyway)")  # fmt: skip
        if self.merge and not self.use_lora:
            raise FinetuneError("--merge: only with --use-lora/--qlora (full fine-tuning writes a full model)")  # fmt: skip


# ---------------------------------------------------------------------- LoRA
def lora_targets(model: HybridLM, target_modules: list[str] | None = None) -> list[str]:
    """The module names LoRA will wrap: the defaults present in `model`, or the checked request."""
    linear = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    valid = sorted(linear - NOT_TARGETS)
    if target_modules is None:
        return [t for t in DEFAULT_TARGETS if t in linear]
    if list(target_modules) == ["all-linear"]:
        return valid
    if not target_modules:
        raise FinetuneError("--target-modules: expected at least one module name")
    for name in target_modules:
        if name in NOT_TARGETS:
            raise FinetuneError(f"--target-modules: {name} cannot take LoRA here (its weight is read directly by "
                                f"a fused kernel, so an adapter would be bypassed); choose from {valid}")  # fmt: skip
        if name not in valid:
            raise FinetuneError(f"--target-modules: unknown module {name!r}; this model has {valid} (or all-linear)")  # fmt: skip
    return list(dict.fromkeys(target_modules))


def apply_lora(model: nn.Module, r: int = 8, alpha: float = 16.0, dropout: float = 0.05,
               target_modules: list[str] | None = None, base_path: str | None = None,
               train_embeddings: bool = False):  # fmt: skip
    """Wrap a core `HybridLM` (or the HF wrapper holding it, for QLoRA) with PEFT LoRA; returns the
    PeftModel. The core's projections are replaced in place, so calling the core trains the adapter.
    train_embeddings: the token embeddings (and an untied lm_head) train in full as PEFT
    `modules_to_save`, kept tied to lm_head; for data whose tokens the base rarely or never saw
    (the chat template's special tokens, another domain's words), as TRL advises for chat SFT."""
    from peft import LoraConfig, get_peft_model

    from .hf import MambaSLMForCausalLM

    if r < 1:
        raise FinetuneError(f"--lora-r: expected a positive integer, got {r}")
    wrapper = model if isinstance(model, MambaSLMForCausalLM) else MambaSLMForCausalLM.from_core(model)
    targets = lora_targets(wrapper.model, target_modules)
    tied = wrapper.model.config.tie_embeddings
    extra = {"modules_to_save": ["embed_tokens"] + ([] if tied else ["lm_head"]), "ensure_weight_tying": tied}
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM",
                        **(extra if train_embeddings else {}))  # fmt: skip
    with _quiet_peft():
        peft_model = get_peft_model(wrapper, config)
    peft_model.peft_config["default"].base_model_name_or_path = base_path
    return peft_model


@contextmanager
def _quiet_peft() -> Iterator[None]:
    """PEFT 0.21 reads transformers' deprecated `is_gradient_checkpointing`: not the user's concern."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def base_fingerprint(model: HybridLM) -> str:
    """sha256 over the base's parameter names, dtypes and bytes: which base an adapter belongs to."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def adapter_meta(base: HybridLM, base_path: str) -> dict[str, Any]:
    return {"base_model": base_path, "base_config": base.config.to_dict(), "base_fingerprint": base_fingerprint(base)}  # fmt: skip


def save_adapter(peft_model, path: str | Path, meta: dict[str, Any]) -> Path:
    """adapter_config.json + adapter_model.safetensors (+ our meta), each renamed into place."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".adapter-", dir=path) as tmp:
        peft_model.save_pretrained(tmp, save_embedding_layers=False)
        atomic_write_json(Path(tmp) / ADAPTER_META, meta)
        for name in (ADAPTER_WEIGHTS, ADAPTER_META, ADAPTER_CONFIG):  # config last: marks a complete adapter
            os.replace(Path(tmp) / name, path / name)
    return path


def check_adapter_fits(base: HybridLM, adapter_dir: str | Path) -> None:
    """One-line FinetuneError when the adapter's recorded base differs in shape or weights from `base`."""
    meta_file = Path(adapter_dir) / ADAPTER_META
    if not meta_file.exists():
        return  # an adapter from elsewhere: PEFT's key and shape checks still apply
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise FinetuneError(f"{meta_file}: unreadable ({e})") from None
    want = meta.get("base_config", {})
    have = json.loads(json.dumps(base.config.to_dict()))
    diff = [k for k in sorted(set(want) | set(have)) if k not in TOKEN_FIELDS and want.get(k) != have.get(k)]
    if diff:
        shown = ", ".join(f"{k} {want.get(k)!r} vs {have.get(k)!r}" for k in diff[:3])
        raise FinetuneError(f"{adapter_dir}: the adapter belongs to another base model (adapter's base vs this "
                            f"one: {shown})")  # fmt: skip
    if meta.get("base_fingerprint") not in (None, base_fingerprint(base)):
        raise FinetuneError(f"{adapter_dir}: the adapter was trained on another base model (same shape, different "
                            f"weights; it was trained on {meta.get('base_model')})")  # fmt: skip


def load_model_with_adapter(base_dir_or_model_dir: str | Path, adapter_dir: str | Path | None = None) -> HybridLM:  # fmt: skip
    """A plain core `HybridLM` with the adapter merged in. `adapter_dir=None`: the path is a model
    directory (loaded as is) or an adapter directory (its recorded base is loaded and merged)."""
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    from .hf import MambaSLMForCausalLM

    path = Path(base_dir_or_model_dir)
    if adapter_dir is None:
        if not is_adapter_dir(path):
            return load_model(path)
        adapter_dir, path = path, recorded_base(path)
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / ADAPTER_CONFIG).exists() or not (adapter_dir / ADAPTER_WEIGHTS).exists():
        raise FinetuneError(f"{adapter_dir}: not an adapter directory (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")  # fmt: skip
    base = load_model(path)
    check_adapter_fits(base, adapter_dir)
    try:
        with _quiet_peft():
            peft_model = PeftModel.from_pretrained(MambaSLMForCausalLM.from_core(base), str(adapter_dir))
        saved = set(load_file(adapter_dir / ADAPTER_WEIGHTS))
    except Exception as e:  # PEFT raises ValueError/RuntimeError/KeyError for adapters that do not fit
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise FinetuneError(f"{adapter_dir}: the adapter does not fit the base model {path} ({first})") from None  # fmt: skip
    expected = set(get_peft_model_state_dict(peft_model))
    if saved != expected:  # PEFT loads non-strictly: modules the adapter misses would stay untrained
        odd = sorted(saved ^ expected)[:2]
        raise FinetuneError(f"{adapter_dir}: the adapter's modules do not match the base model {path} (e.g. {odd})")  # fmt: skip
    peft_model.merge_and_unload()  # folds each LoRA delta into the core's own Linear weights, in place
    return base


def is_adapter_dir(path: str | Path) -> bool:
    """An adapter directory alone (a fine-tune's output), not a model directory."""
    return (Path(path) / ADAPTER_CONFIG).exists() and not (Path(path) / CONFIG_NAME).exists()


def recorded_base(adapter_dir: Path) -> Path:
    """The local base model directory an adapter was trained on, as its adapter_config.json says."""
    try:
        base = json.loads((adapter_dir / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    except (OSError, json.JSONDecodeError) as e:
        raise FinetuneError(f"{adapter_dir / ADAPTER_CONFIG}: unreadable ({e})") from None
    if not base or not (Path(base) / CONFIG_NAME).exists():
        raise FinetuneError(f"{adapter_dir}: its base model {base!r} is not a local model directory; pass the base")  # fmt: skip
    return Path(base)


# ---------------------------------------------------------------------- QLoRA
def require_qlora() -> None:
    if not torch.cuda.is_available():
        raise FinetuneError("--qlora: 4-bit NF4 quantization (bitsandbytes) needs a CUDA GPU and this machine has "
                            "none; use --use-lora (LoRA on the full-precision base) instead")  # fmt: skip
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise FinetuneError("--qlora: bitsandbytes is not installed; pip install -e '.[gpu]'") from None


def quantize_4bit(core: HybridLM, compute_dtype: torch.dtype = torch.bfloat16, device: Any = None):
    """The HF wrapper around `core` with every LoRA-able projection replaced, in place, by bitsandbytes'
    4-bit NF4 `Linear4bit` (double quantization), on `device` (default: the current CUDA device).
    Done here, not by transformers' quantizer, which converts only modules of type exactly nn.Linear."""
    import bitsandbytes as bnb
    from peft import prepare_model_for_kbit_training

    from .hf import MambaSLMForCausalLM

    for name, module in list(core.named_modules()):
        parent, _, child = name.rpartition(".")
        if not isinstance(module, nn.Linear) or child in NOT_TARGETS:
            continue  # lm_head (tied, read directly by the loss) and the embeddings stay full precision
        q = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                              compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4")  # fmt: skip
        q.weight = bnb.nn.Params4bit(module.weight.data, requires_grad=False, compress_statistics=True, quant_type="nf4")  # fmt: skip
        if module.bias is not None:
            q.bias = nn.Parameter(module.bias.data, requires_grad=False)
        setattr(core.get_submodule(parent), child, q)
    core.to(torch.cuda.current_device() if device is None else device)  # Params4bit quantizes as it moves
    wrapper = MambaSLMForCausalLM.from_core(core)
    wrapper.is_loaded_in_4bit = True  # PEFT picks its 4-bit LoRA layer (and kbit preparation) on this flag
    return prepare_model_for_kbit_training(wrapper, use_gradient_checkpointing=False)


# ---------------------------------------------------------------------- training
class AdapterTrainer(Trainer):
    """The training loop, saving (and resuming from) a PEFT adapter instead of the whole model."""

    def __init__(self, peft_model, meta: dict[str, Any], *args: Any, **kwargs: Any) -> None:
        self.peft_model, self.adapter_meta = peft_model, meta
        super().__init__(*args, **kwargs)

    def _save_weights(self, path: Path) -> None:
        save_adapter(self.peft_model, path, self.adapter_meta)

    def _load_weights(self, ckpt: Path) -> None:
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        try:
            state = load_file(ckpt / ADAPTER_WEIGHTS)
        except Exception as e:  # SafetensorError, OSError
            raise CheckpointError(f"{ckpt / ADAPTER_WEIGHTS}: unreadable adapter ({e})") from None
        result = set_peft_model_state_dict(self.peft_model, state)
        if result.unexpected_keys:
            raise CheckpointError(f"{ckpt}: adapter keys do not match this model ({result.unexpected_keys[:2]})")  # fmt: skip


def load_examples(args: FinetuneArgs, tokenizer) -> tuple[list, list]:
    """(train, held-out) examples: (input_ids, labels) conversations with --chat, else packed text blocks."""
    if args.chat:
        from .chat_data import CHATTERBOT, load_conversations, split_conversations, tokenize_conversations

        conversations = load_conversations(args.dataset or CHATTERBOT, args.max_samples)
        train, val = split_conversations(conversations, args.validation_split, args.train.seed)
        return tuple(tokenize_conversations(part, tokenizer, args.max_length) for part in (train, val))
    from .data import DataSpec, load_corpus, tokenize_and_pack

    spec = DataSpec(dataset=args.dataset or "shakespeare", dataset_config=args.dataset_config, split=args.split,
                    text_field=args.text_field, max_samples=args.max_samples, validation_split=args.validation_split,
                    streaming=args.streaming, seed=args.train.seed)  # fmt: skip
    corpus = load_corpus(spec)
    return tuple(tokenize_and_pack(corpus[s], tokenizer, args.max_length)["input_ids"] for s in ("train", "validation"))  # fmt: skip


def chat_generation_config(config, tokenizer, chat: bool) -> dict[str, Any]:
    """generation_config.json's defaults; a chat model's reply also ends at the end-of-turn token."""
    generation = generation_config_json(config)
    end = tokenizer.convert_tokens_to_ids("<|end|>") if chat else None
    if isinstance(end, int) and end != tokenizer.unk_token_id:
        eos = generation.get("eos_token_id")
        generation["eos_token_id"] = [eos, end] if eos is not None and eos != end else end
    return generation


# Called with each directory the fine-tuning wrote (the adapter or model, the merged model), the
# tuned model as a plain `HybridLM` (adapter merged in) and its training token sequences.
SavedHook = Callable[[Path, HybridLM, list[list[int]]], None]


def run_finetune(args: FinetuneArgs, on_saved: SavedHook | None = None) -> dict[str, Any]:
    """Fine-tune `args.base` as `args` says; writes args.train.output_dir; returns a summary.
    on_saved: what else to write beside the result (the CLI: prompt lookup's table)."""
    from .tokenizer import load_tokenizer

    start = time.perf_counter()
    if args.qlora:
        require_qlora()  # before any data is fetched
    base_path = str(Path(args.base).resolve())
    base = load_model(args.base)  # CheckpointError for a missing or broken base
    if args.tokenizer is None and not (Path(args.base) / "tokenizer_config.json").exists():
        raise FinetuneError(f"{args.base}: no tokenizer files in the base directory; pass --tokenizer")
    tokenizer = load_tokenizer(args.tokenizer or args.base)
    if len(tokenizer) > base.config.vocab_size:
        raise FinetuneError(f"tokenizer: {len(tokenizer)} tokens, but the base's vocabulary has {base.config.vocab_size}")  # fmt: skip
    train_ex, val_ex = load_examples(args, tokenizer)
    if not train_ex:
        raise FinetuneError("the training data has no example with a target token after --max-length truncation")  # fmt: skip
    targets = lora_targets(base, args.target_modules) if args.use_lora else None  # errors before heavy work
    base_parameters = base.num_parameters()  # before 4-bit packing and PEFT's copies of modules_to_save
    train_args = args.train
    if args.qlora:
        meta = adapter_meta(base, base_path)  # the full-precision base's fingerprint, before quantizing
        if train_args.mixed_precision == "no":  # keep activations in the 4-bit layers' compute dtype
            train_args.mixed_precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        dtype = torch.bfloat16 if train_args.mixed_precision == "bf16" else torch.float16
        peft_model = apply_lora(quantize_4bit(base, dtype), args.lora_r, args.lora_alpha, args.lora_dropout,
                                targets, base_path, args.train_embeddings)  # fmt: skip
    elif args.use_lora:
        meta = adapter_meta(base, base_path)
        peft_model = apply_lora(base, args.lora_r, args.lora_alpha, args.lora_dropout, targets, base_path,
                                args.train_embeddings)  # fmt: skip
    core: HybridLM = peft_model.base_model.model.model if args.use_lora else base
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if args.use_lora:
        trainer: Trainer = AdapterTrainer(peft_model, meta, core, train_ex, val_ex, train_args, pad_id, tokenizer)  # fmt: skip
    else:
        trainer = Trainer(core, train_ex, val_ex, train_args, pad_id, tokenizer)
    # training_args.json, in the output and every checkpoint: the loop's settings plus ours (`chat`
    # marks a chat-tuned model for `chat`/`generate`); a chat model's generation stops at a turn's end
    recorded = {**asdict(train_args), **{k: v for k, v in asdict(args).items() if k != "train"}, "base": base_path}  # fmt: skip
    trainer.recorded_args = recorded
    trainer.generation_config = chat_generation_config(core.config, tokenizer, args.chat)
    trainable = core.num_parameters(trainable_only=True)
    lora_parameters = sum(p.numel() for n, p in core.named_parameters() if "lora_" in n)
    total = base_parameters + lora_parameters
    print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")  # fmt: skip
    print(f"{'LoRA' if args.use_lora else 'full'} fine-tuning{' (QLoRA, 4-bit NF4 base)' if args.qlora else ''}"
          f"{' on LoRA targets ' + ','.join(targets) if targets else ''}; {len(train_ex):,} training and "
          f"{len(val_ex):,} held-out {'conversations' if args.chat else 'blocks'}")  # fmt: skip
    before = trainer.evaluate() if val_ex else None
    train_start = time.perf_counter()
    result = trainer.train()
    train_seconds = time.perf_counter() - train_start
    after = trainer.evaluate() if val_ex else None
    out = Path(train_args.output_dir)
    merged_dir = None
    if args.merge and trainer.accelerator.is_main_process:
        merged_dir = out / "merged"
        merged = load_model_with_adapter(base_path, out)
        save_model(merged, merged_dir, chat_generation_config(merged.config, tokenizer, args.chat))
        save_tokenizer(tokenizer, merged_dir)
        atomic_write_json(merged_dir / "training_args.json", recorded)
    if on_saved is not None and trainer.accelerator.is_main_process:
        # Read back as saved: a whole fp32 model, also after QLoRA or where training sharded it.
        tuned = load_model_with_adapter(base_path, out) if args.use_lora else load_model(out)
        sequences = [ids for ids, _ in train_ex] if args.chat else train_ex
        for model_dir in [d for d in (out, merged_dir) if d is not None]:
            on_saved(model_dir, tuned, sequences)
    summary = {
        "step": result["step"], "trainable_parameters": trainable, "total_parameters": total,
        "trainable_fraction": trainable / total, "val_loss_before": before, "val_loss_after": after,
        "train_examples": len(train_ex), "val_examples": len(val_ex), "train_seconds": train_seconds,
        "wall_seconds": time.perf_counter() - start, "targets": targets, "merged_dir": str(merged_dir) if merged_dir else None,
    }  # fmt: skip
    if trainer.accelerator.is_main_process:
        atomic_write_json(out / "finetune_summary.json", summary)
    if before is not None and after is not None:
        drop = 100 * (1 - after / before) if before > 0 else 0.0
        print(f"held-out loss {before:.4f} -> {after:.4f} ({drop:.1f}% lower; perplexity "
              f"{math.exp(min(before, 50)):.1f} -> {math.exp(min(after, 50)):.1f})")  # fmt: skip
    return summary
