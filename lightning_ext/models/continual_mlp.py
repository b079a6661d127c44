"""An MLP with one head per task, for task-incremental continual learning (e.g. CLNP)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_ext.losses import per_sample_cross_entropy


class ContinualMLP(pl.LightningModule):
    """``in -> hidden (ReLU) x len(hidden)`` trunk (``self.net``) and ``self.heads[t]`` for task ``t``.

    Batches are ``(x, y, task)`` (:class:`~lightning_ext.data.SplitDigitsDataModule`); every sample of a
    batch belongs to the same task. ``training_step`` follows the per-sample loss contract;
    validation / test log ``val/acc`` / ``test/acc``. Adam(lr) unless the CLI sets an optimizer.
    """

    def __init__(self, in_features: int = 64, hidden: list[int] | None = None, num_tasks: int = 5,
                 classes_per_task: int = 2, lr: float = 3e-3) -> None:
        super().__init__()
        hidden = [128, 128] if hidden is None else list(hidden)
        if in_features < 1 or num_tasks < 1 or classes_per_task < 2 or any(h < 1 for h in hidden) or lr <= 0:
            raise ValueError(f"need in_features >= 1, num_tasks >= 1, classes_per_task >= 2, hidden widths >= 1 "
                             f"and lr > 0; got {in_features}, {num_tasks}, {classes_per_task}, {hidden}, {lr}")
        self.save_hyperparameters()
        layers: list[nn.Module] = []
        for a, b in zip([in_features, *hidden][:-1], hidden):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.net = nn.Sequential(*layers)
        self.heads = nn.ModuleList(nn.Linear(hidden[-1], classes_per_task) for _ in range(num_tasks))

    def forward(self, x: torch.Tensor, task: int) -> torch.Tensor:
        return self.heads[task](self.net(x))

    @staticmethod
    def _task(task: torch.Tensor) -> int:
        return int(task[0])

    def training_step(self, batch, batch_idx):
        x, y, task = batch
        logits = self(x, self._task(task))
        per_sample, num_tokens = per_sample_cross_entropy(logits, y)
        loss = per_sample.mean()
        self.log("train/loss", loss, prog_bar=True)
        return {"loss": loss, "per_sample_loss": per_sample, "num_tokens": num_tokens}

    def _accuracy(self, batch, name: str) -> None:
        x, y, task = batch
        acc = (self(x, self._task(task)).argmax(-1) == y).float().mean()
        self.log(name, acc, prog_bar=True, batch_size=len(y))

    def validation_step(self, batch, batch_idx):
        self._accuracy(batch, "val/acc")

    def test_step(self, batch, batch_idx):
        self._accuracy(batch, "test/acc")

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
