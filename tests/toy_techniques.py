"""A minimal technique used by the manifest tests: surgery that adds a parameter per Linear."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_ext.callbacks import Technique
from lightning_ext.surgery import replace_modules, select_modules


class GatedLinear(nn.Module):
    def __init__(self, inner: nn.Linear, init: float) -> None:
        super().__init__()
        self.inner = inner
        self.gate = nn.Parameter(torch.full((inner.out_features,), init))

    def forward(self, x):
        return self.inner(x) * self.gate


class Gate(Technique):
    """Wraps the targeted Linear layers with a learnable output gate (changes checkpoint keys)."""

    def __init__(self, target_modules: list[str] | None = None, init: float = 1.0) -> None:
        super().__init__()
        self.target_modules = target_modules or ["0"]
        self.init = init

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        targets = select_modules(pl_module, self.target_modules, types=[nn.Linear])
        replace_modules(pl_module, targets, lambda name, old: GatedLinear(old, self.init))


class Counted(Technique):
    """Counts the training batches it saw (state that must survive a resume); ``tag`` tells instances apart."""

    identity_args = ("tag",)
    non_config_args = ("notes",)

    def __init__(self, tag: str = "a", notes: object = None) -> None:
        super().__init__()
        self.tag = tag
        self.state = {"batches": 0}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.state["batches"] += 1
