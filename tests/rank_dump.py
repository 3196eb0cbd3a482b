"""A test-only callback: every rank saves its trained weights, so tests can compare ranks."""
from pathlib import Path

import pytorch_lightning as pl
import torch


class DumpWeightsPerRank(pl.Callback):
    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)

    def on_train_end(self, trainer, pl_module):
        self.out_dir.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items() if isinstance(v, torch.Tensor)}
        torch.save(state, self.out_dir / f"rank{trainer.global_rank}.pt")
