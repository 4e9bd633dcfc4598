"""Pre-training loop on Accelerate: one code path for a laptop CPU, one GPU, DDP or FSDP.

Choices:
  * Accelerate owns devices, mixed precision (bf16, or fp16 with loss scaling) and the
    distributed wrappers; under `accelerate launch` / `torchrun` the same command runs DDP.
  * The data order is a seeded permutation per epoch, cut into per-rank batches by index, so
    a checkpoint records its position as (epoch, batch) and a resumed run sees exactly the
    batches an uninterrupted run would have seen.
  * A checkpoint (`checkpoint-N/`: model, optimizer, scheduler, RNG, position, log) is written
    to a temporary directory and renamed into place, so a crash (even `kill -9`) leaves the
    previous checkpoint intact; only the last `save_total_limit` are kept.
  * An output directory holds one run: a fresh run refuses a directory with an earlier run's
    checkpoints (they would be pruned in its place, and a later `--resume` would pick the other
    run's), unless told to delete them; `--resume` refuses flags that change the data order.
  * The loss is computed without materialising the logits (`return_logits=False`).
  * An example is a token block or an (input_ids, labels) pair (chat SFT), right-padded; the
    `_save_weights` / `_load_weights` hooks let fine-tuning save a PEFT adapter.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoint import CheckpointError, atomic_write, atomic_write_json, load_model, save_model
from .config import ModelConfig
from .errors import describe
from .model.hybrid import HybridLM
from .runtime import tune_cpu_allocator
from .tokenizer import save_tokenizer


class TrainError(ValueError):
    """A training run that cannot start or continue; the message says why."""


@dataclass
class TrainArgs:
    output_dir: str
    max_steps: int | None = None  # optimizer steps; default: num_train_epochs over the data
    num_train_epochs: float = 1.0
    batch_size: int = 8  # per device, per micro-step
    gradient_accumulation_steps: int = 1
    learning_rate: float = 5e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"  # no | bf16 | fp16
    gradient_checkpointing: bool = False
    logging_steps: int = 10
    eval_steps: int = 200
    eval_batches: int = 50
    early_stopping_patience: int | None = None
    save_steps: int = 500
    save_total_limit: int = 2
    seed: int = 0
    resume: bool = False
    overwrite_output_dir: bool = False  # a fresh run may delete an earlier run's checkpoints
    compile: bool = False
    fsdp: bool = False  # shard parameters, gradients and optimizer state across processes
    show_progress: bool = True

    def __post_init__(self) -> None:
        for name in (
            "batch_size",
            "gradient_accumulation_steps",
            "logging_steps",
            "save_total_limit",
            "eval_batches",
        ):
            if getattr(self, name) < 1:
                raise TrainError(
                    f"--{name.replace('_', '-')}: expected a positive integer, got {getattr(self, name)}"
                )
        for name in ("max_steps", "early_stopping_patience"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise TrainError(
                    f"--{name.replace('_', '-')}: expected a positive integer, got {getattr(self, name)}"
                )
        for name in ("warmup_steps", "eval_steps", "save_steps"):
            if getattr(self, name) < 0:
                raise TrainError(f"--{name.replace('_', '-')}: expected 0 or more, got {getattr(self, name)}")
        if not self.learning_rate > 0 or not self.num_train_epochs > 0:
            raise TrainError("--learning-rate and --num-train-epochs: expected positive numbers")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise TrainError(f"mixed_precision: expected no, bf16 or fp16, got {self.mixed_precision!r}")


def lr_factor(step: int, args: TrainArgs, total_steps: int) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio."""
    if step < args.warmup_steps:
        return (step + 1) / args.warmup_steps
    progress = min(1.0, (step - args.warmup_steps) / max(1, total_steps - args.warmup_steps))
    return args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def batch_indices(
    n_blocks: int, batch_size: int, epoch: int, seed: int, rank: int, world: int
) -> list[list[int]]:
    """This rank's batches for one epoch: a seeded permutation, cut into global batches."""
    order = torch.randperm(
        n_blocks, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    ).tolist()
    global_batch = batch_size * world
    return [
        order[start + rank * batch_size : start + (rank + 1) * batch_size]
        for start in range(0, n_blocks - global_batch + 1, global_batch)
    ]


def collate(blocks: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad a batch of blocks; returns input_ids and attention_mask (b, longest)."""
    width = max(len(b) for b in blocks)
    ids = torch.full((len(blocks), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(blocks), width), dtype=torch.long)
    for i, block in enumerate(blocks):
        ids[i, : len(block)] = torch.tensor(block)
        mask[i, : len(block)] = 1
    return ids, mask


Example = list[int] | tuple[list[int], list[int]]  # a block, or (input_ids, labels) with -100 = no loss


def collate_examples(examples: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad blocks or (input_ids, labels) pairs: input_ids, attention_mask, labels (b, longest)."""
    pairs = [e if isinstance(e, tuple) else (e, e) for e in examples]
    ids, mask = collate([p[0] for p in pairs], pad_id)
    labels = torch.full_like(ids, -100)
    for i, (_, lab) in enumerate(pairs):
        labels[i, : len(lab)] = torch.tensor(lab)
    return ids, mask, labels


def checkpoints(output_dir: Path) -> list[Path]:
    """The `checkpoint-N` directories, oldest (lowest N) first."""
    found = [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = checkpoints(output_dir)
    return found[-1] if found else None


# Flags that decide which batches a step sees: a resumed run must keep them to continue exactly.
DATA_ORDER_FLAGS = ("batch_size", "gradient_accumulation_steps", "seed")


class Trainer:
    def __init__(self, model: HybridLM, train_blocks: list[Example], val_blocks: list[Example], args: TrainArgs,
                 pad_id: int = 0, tokenizer: Any = None) -> None:  # fmt: skip
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState
        from accelerate.utils import DistributedType

        tune_cpu_allocator()
        AcceleratorState._reset_state()  # a process may run several trainers (mixed precision differs)
        self.args, self.tokenizer, self.pad_id = args, tokenizer, pad_id
        # What every saved model directory records (training_args.json) and its generation defaults;
        # fine-tuning adds its own settings (e.g. `chat`, which `generate` and `chat` read).
        self.recorded_args: dict[str, Any] = asdict(args)
        self.generation_config: dict[str, Any] | None = None
        self.output_dir = Path(args.output_dir)
        self._check_output_dir()
        plugin = None
        if args.fsdp:
            from accelerate.utils import FullyShardedDataParallelPlugin

            plugin = FullyShardedDataParallelPlugin(use_orig_params=True)
        self.accelerator = Accelerator(
            mixed_precision=args.mixed_precision, cpu=not torch.cuda.is_available(), fsdp_plugin=plugin
        )
        if args.fsdp and self.accelerator.distributed_type != DistributedType.FSDP:
            raise TrainError(
                f"--fsdp: Accelerate shards with FSDP only across several GPUs/accelerators, and this run is "
                f"{self.accelerator.num_processes} process(es) on {self.accelerator.device.type}; "
                "drop --fsdp (DDP is used automatically under accelerate launch/torchrun)"
            )
        torch.manual_seed(args.seed)
        if args.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        self.train_blocks, self.val_blocks = train_blocks, val_blocks
        world = self.accelerator.num_processes
        per_epoch = len(batch_indices(len(train_blocks), args.batch_size, 0, args.seed, 0, world))
        if per_epoch == 0:
            raise TrainError(
                f"the training data has {len(train_blocks)} blocks, fewer than one batch of "
                f"{args.batch_size * world}; lower --batch-size or add data"
            )
        self.micro_per_epoch = per_epoch
        steps_per_epoch = max(1, per_epoch // args.gradient_accumulation_steps)
        self.total_steps = args.max_steps or max(1, int(args.num_train_epochs * steps_per_epoch))
        trainable = [p for p in model.parameters() if p.requires_grad]  # LoRA: the adapter only
        decay = [p for p in trainable if p.dim() >= 2]
        no_decay = [p for p in trainable if p.dim() < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=args.learning_rate, betas=(0.9, 0.95),
        )  # fmt: skip
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, args, self.total_steps)
        )
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.core: HybridLM = self.accelerator.unwrap_model(self.model)
        self.forward = torch.compile(self.model) if args.compile else self.model
        self.state: dict[str, Any] = {
            "step": 0,
            "epoch": 0,
            "micro": 0,
            "best_val_loss": None,
            "bad_evals": 0,
        }
        self.log: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ setup
    def _check_output_dir(self) -> None:
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TrainError(
                f"{self.output_dir}: cannot create the output directory ({e.strerror})"
            ) from None
        if not os.access(self.output_dir, os.W_OK):
            raise TrainError(f"{self.output_dir}: the output directory is not writable")
        earlier = latest_checkpoint(self.output_dir)
        if earlier is None and (self.output_dir / "best").is_dir():
            earlier = self.output_dir / "best"
        if earlier is not None and not (self.args.resume or self.args.overwrite_output_dir):
            raise TrainError(
                f"{self.output_dir}: holds {earlier.name} of an earlier run; pass --resume to continue it, "
                "--overwrite-output-dir to delete its checkpoints and start over, or another --output-dir"
            )

    def _start_fresh(self) -> None:
        """Clear what an earlier run left that this one would otherwise mix with its own: its
        checkpoints and best model (only with --overwrite-output-dir, see _check_output_dir) and its
        log, which describes the model files this run replaces."""
        if not self.accelerator.is_main_process:
            return
        for old in [*checkpoints(self.output_dir), self.output_dir / "best"]:
            shutil.rmtree(old, ignore_errors=True)
        (self.output_dir / "training_log.jsonl").unlink(missing_ok=True)

    # ------------------------------------------------------------------ loop
    def train(self) -> dict[str, Any]:
        args, acc = self.args, self.accelerator
        if args.resume:
            self._resume()
        else:
            self._start_fresh()
        from tqdm.auto import tqdm

        bar = tqdm(
            total=self.total_steps,
            initial=self.state["step"],
            disable=not (args.show_progress and acc.is_main_process),
        )
        self.model.train()
        # The losses of the steps since the last log line travel in checkpoints, so a run resumed
        # mid-window logs the mean an uninterrupted run would have.
        window = self.state.setdefault("log_window", {"loss": 0.0, "steps": 0})
        window_tokens, window_start = 0, time.perf_counter()
        while self.state["step"] < self.total_steps:
            loss_sum, tokens = 0.0, 0
            for _ in range(args.gradient_accumulation_steps):
                ids, mask, labels = self._next_batch()
                with acc.autocast():
                    out = self.forward(ids, attention_mask=mask, labels=labels, return_logits=False)
                acc.backward(out.loss / args.gradient_accumulation_steps)
                loss_sum += out.loss.item() / args.gradient_accumulation_steps
                tokens += int(mask.sum())
            if args.max_grad_norm:
                acc.clip_grad_norm_(self.model.parameters(), args.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.state["step"] += 1
            step = self.state["step"]
            window["loss"] += loss_sum
            window["steps"] += 1
            window_tokens += tokens * acc.num_processes
            bar.update(1)
            if step % args.logging_steps == 0 or step == self.total_steps:
                elapsed = time.perf_counter() - window_start
                entry = {"step": step, "loss": window["loss"] / window["steps"], "lr": self.scheduler.get_last_lr()[0],
                         "tokens_per_s": window_tokens / max(elapsed, 1e-9)}  # fmt: skip
                self._log(entry)
                bar.set_postfix(
                    loss=f"{entry['loss']:.4f}", lr=f"{entry['lr']:.2e}", tok_s=f"{entry['tokens_per_s']:.0f}"
                )
                window.update(loss=0.0, steps=0)
                window_tokens, window_start = 0, time.perf_counter()
            stop = False
            if args.eval_steps and (step % args.eval_steps == 0 or step == self.total_steps):
                stop = self._evaluate_and_track()
            if args.save_steps and step % args.save_steps == 0:
                self.save_checkpoint()
            if stop:
                break
        bar.close()
        return self._finish()

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        acc = self.accelerator
        if self.state["micro"] >= self.micro_per_epoch:
            self.state["epoch"] += 1
            self.state["micro"] = 0
        epoch = self.state["epoch"]
        if getattr(self, "_epoch_batches", (None,))[0] != epoch:
            self._epoch_batches = (epoch, batch_indices(len(self.train_blocks), self.args.batch_size, epoch,
                                                        self.args.seed, acc.process_index, acc.num_processes))  # fmt: skip
        chosen = self._epoch_batches[1][self.state["micro"]]
        self.state["micro"] += 1
        ids, mask, labels = collate_examples([self.train_blocks[i] for i in chosen], self.pad_id)
        return ids.to(acc.device), mask.to(acc.device), labels.to(acc.device)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation loss per target token (on every rank's share, averaged)."""
        self.model.eval()
        acc = self.accelerator
        total = torch.zeros(2, device=acc.device)
        blocks = self.val_blocks[acc.process_index :: acc.num_processes]
        for start in range(
            0, min(len(blocks), self.args.eval_batches * self.args.batch_size), self.args.batch_size
        ):
            ids, mask, labels = collate_examples(blocks[start : start + self.args.batch_size], self.pad_id)
            ids, mask, labels = ids.to(acc.device), mask.to(acc.device), labels.to(acc.device)
            with acc.autocast():
                loss = self.core(ids, attention_mask=mask, labels=labels, return_logits=False).loss
            n = float((HybridLM.shift_labels(labels, mask.bool()) != -100).sum())  # the loss's targets
            total += torch.tensor([loss.item() * n, n], device=acc.device)
        total = acc.reduce(total, reduction="sum")
        self.model.train()
        return (total[0] / total[1].clamp_min(1)).item()

    def _evaluate_and_track(self) -> bool:
        if not self.val_blocks:
            return False
        val = self.evaluate()
        self._log({"step": self.state["step"], "val_loss": val, "val_perplexity": math.exp(min(val, 50))})
        best = self.state["best_val_loss"]
        if best is None or val < best:
            self.state["best_val_loss"], self.state["bad_evals"] = val, 0
            if self.args.early_stopping_patience is not None:
                self._save_output(self.output_dir / "best")
            return False
        self.state["bad_evals"] += 1
        patience = self.args.early_stopping_patience
        return patience is not None and self.state["bad_evals"] >= patience

    def _log(self, entry: dict[str, Any]) -> None:
        self.log.append(entry)
        if self.accelerator.is_main_process:
            with open(self.output_dir / "training_log.jsonl", "a") as f:
                f.write(json.dumps(entry) + "\n")
            if (writer := self._tensorboard()) is not None:
                for key, value in entry.items():
                    if key != "step":
                        writer.add_scalar(key, value, entry["step"])

    def _tensorboard(self):
        """A TensorBoard writer under output_dir/runs when tensorboard is installed, else None."""
        if not hasattr(self, "_tb"):
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.output_dir / "runs"))
            except ImportError:
                self._tb = None
        return self._tb

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path | None:
        acc = self.accelerator
        acc.wait_for_everyone()
        final = self.output_dir / f"checkpoint-{self.state['step']}"
        if not acc.is_main_process:
            return None
        tmp = self.output_dir / f".tmp-{final.name}"
        shutil.rmtree(tmp, ignore_errors=True)
        self._save_weights(tmp)
        self._save_tokenizer_and_args(tmp)  # a checkpoint also loads as a model for generate/chat
        torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, tmp / "rng.pt")
        atomic_write_json(tmp / "trainer_state.json", {"state": self.state, "scheduler": self.scheduler.state_dict(),
                                                       "log": self.log, "args": asdict(self.args),
                                                       "world": acc.num_processes,
                                                       "train_examples": len(self.train_blocks)})  # fmt: skip
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)  # a checkpoint directory exists only once complete
        for old in checkpoints(self.output_dir)[: -self.args.save_total_limit]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def _resume(self) -> None:
        ckpt = latest_checkpoint(self.output_dir)
        if ckpt is None:
            raise TrainError(
                f"{self.output_dir}: --resume, but there is no checkpoint-N directory to resume from"
            )
        try:
            meta = json.loads((ckpt / "trainer_state.json").read_text())
            scheduler, state, log = meta["scheduler"], meta["state"], meta["log"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise TrainError(f"{ckpt}: corrupt checkpoint (trainer_state.json: {describe(e)})") from None
        self._check_same_data_order(ckpt, meta)
        try:
            self._load_weights(ckpt)
            self.optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
            rng = torch.load(ckpt / "rng.pt", weights_only=True)
            torch.set_rng_state(rng["torch"])
        except (OSError, ValueError, RuntimeError, KeyError, TypeError, IndexError, EOFError,
                pickle.UnpicklingError) as e:  # fmt: skip
            if isinstance(e, TrainError):
                raise
            if isinstance(e, CheckpointError):
                raise TrainError(f"{ckpt}: corrupt checkpoint ({e})") from None
            raise TrainError(f"{ckpt}: corrupt checkpoint ({describe(e)})") from None
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.scheduler.load_state_dict(scheduler)
        self.state, self.log = state, log
        log_file = self.output_dir / "training_log.jsonl"
        if self.accelerator.is_main_process:  # drop lines written after the checkpoint
            lines = "".join(json.dumps(e) + "\n" for e in self.log)
            atomic_write(log_file, lambda tmp: Path(tmp).write_text(lines))

    def _save_weights(self, path: Path) -> None:
        save_model(self.core, path, self.generation_config)

    def _check_same_data_order(self, ckpt: Path, meta: dict[str, Any]) -> None:
        saved = meta.get("args") or {}
        world = meta.get("world", self.accelerator.num_processes)  # older checkpoints did not record it
        changed = [
            f"--{name.replace('_', '-')} {saved[name]} (this run: {getattr(self.args, name)})"
            for name in DATA_ORDER_FLAGS
            if name in saved and saved[name] != getattr(self.args, name)
        ]
        if world != self.accelerator.num_processes:
            changed.append(f"{world} processes (this run: {self.accelerator.num_processes})")
        examples = meta.get("train_examples", len(self.train_blocks))
        if examples != len(self.train_blocks):  # another dataset, block size or tokenizer
            changed.append(f"{examples} training examples (this run: {len(self.train_blocks)})")
        if changed:
            raise TrainError(
                f"{ckpt}: written with {', '.join(changed)}; resume with the same data and values, "
                "which decide the batches each step sees"
            )

    def _load_weights(self, ckpt: Path) -> None:
        saved = load_model(ckpt)
        theirs, ours = saved.config.to_dict(), self.core.config.to_dict()
        differ = [f"{k} {theirs[k]!r} (this run: {ours[k]!r})" for k in ours if theirs.get(k) != ours[k]]
        if differ:
            raise TrainError(
                f"{ckpt}: a different model, {'; '.join(differ[:4])}; resume with the same model flags"
            )
        self.core.load_state_dict(saved.state_dict())

    # ------------------------------------------------------------------ output
    def _save_tokenizer_and_args(self, path: Path) -> None:
        if self.tokenizer is not None:
            save_tokenizer(self.tokenizer, path)
        atomic_write_json(path / "training_args.json", self.recorded_args)

    def _save_output(self, path: Path) -> None:
        """A model directory (`best/`, the final one) that loads and generates as the run meant."""
        if self.accelerator.is_main_process:
            self._save_weights(path)
            self._save_tokenizer_and_args(path)

    def _finish(self) -> dict[str, Any]:
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            self._save_output(self.output_dir)
            plot_losses(self.log, self.output_dir / "loss_curve.png")
        return {"step": self.state["step"], "best_val_loss": self.state["best_val_loss"], "log": self.log}


def plot_losses(log: list[dict[str, Any]], path: Path) -> None:
    """Training loss and validation perplexity against steps, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(e["step"], e["loss"]) for e in log if "loss" in e]
    val = [(e["step"], e["val_perplexity"]) for e in log if "val_perplexity" in e]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if val:
        ax2 = ax.twinx()
        ax2.plot(*zip(*val, strict=True), "o-", color="tab:orange", label="validation perplexity")
        ax2.set_ylabel("perplexity")
        ax2.legend(loc="upper center")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def build_model(config: ModelConfig, init_from: str | None = None) -> HybridLM:
    if init_from:
        return load_model(init_from)
    return HybridLM(config)
