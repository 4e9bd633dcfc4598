"""Run by tests/test_train.py under torchrun: two CPU processes (gloo) train the same model with DDP."""

import hashlib
import json
import sys
from pathlib import Path

import torch

from mamba_slm import HybridLM, ModelConfig
from mamba_slm.train import TrainArgs, Trainer

out = Path(sys.argv[1])
torch.manual_seed(0)
model = HybridLM(ModelConfig.from_preset("tiny"))
initial = {k: v.clone() for k, v in model.state_dict().items()}
g = torch.Generator().manual_seed(1)
blocks = [torch.randint(1, 256, (33,), generator=g).tolist() for _ in range(32)]
args = TrainArgs(output_dir=str(out / "run"), max_steps=3, batch_size=2, eval_steps=0, save_steps=0,
                 logging_steps=1, show_progress=False)  # fmt: skip
trainer = Trainer(model, blocks, blocks[:4], args)
trainer.train()
state = {k: v.detach().float().cpu() for k, v in trainer.core.state_dict().items()}
digest = hashlib.sha256(b"".join(state[k].numpy().tobytes() for k in sorted(state))).hexdigest()
changed = any(not torch.equal(state[k], initial[k].float()) for k in initial)
rank = trainer.accelerator.process_index
acc = trainer.accelerator
record = {"digest": digest, "changed": changed, "world": acc.num_processes, "type": str(acc.distributed_type)}
(out / f"rank{rank}.json").write_text(json.dumps(record))
