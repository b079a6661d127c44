"""An MLP classifier for :class:`~lightning_ext.data.DigitsDataModule`."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_ext.losses import per_sample_cross_entropy


class MLPClassifier(pl.LightningModule):
    """``in -> hidden (ReLU) x len(hidden) -> classes``; ``self.net`` is an ``nn.Sequential``.

    With ``batch_norm=True`` each hidden Linear (then without bias) is followed by BatchNorm, which
    makes each row of its weight scale-invariant (what AdamP/SGDP's projection acts on); ``layer_norm=True``
    puts LayerNorm there instead, which makes the whole weight scale-invariant and, unlike BatchNorm, treats
    each sample alone (a run on 2 ranks of 32 then computes what one process computes on the batch of 64).

    ``training_step`` follows the per-sample loss contract (``loss``, ``per_sample_loss``,
    ``num_tokens`` = 1 per sample, ``logits``); validation logs ``val/acc`` and ``val/loss``.
    Without a CLI ``optimizer:`` section it uses torch's AdamW(lr, weight_decay).
    """

    def __init__(self, in_features: int = 64, hidden: list[int] | None = None, num_classes: int = 10,
                 lr: float = 1e-3, weight_decay: float = 0.0, batch_norm: bool = False,
                 layer_norm: bool = False) -> None:
        super().__init__()
        hidden = [64] if hidden is None else list(hidden)
        if in_features < 1 or num_classes < 2 or any(h < 1 for h in hidden):
            raise ValueError(f"need in_features >= 1, num_classes >= 2, hidden widths >= 1; got "
                             f"in_features={in_features}, num_classes={num_classes}, hidden={hidden}")
        if lr <= 0 or weight_decay < 0:
            raise ValueError(f"need lr > 0 and weight_decay >= 0, got lr={lr}, weight_decay={weight_decay}")
        if batch_norm and layer_norm:
            raise ValueError("batch_norm and layer_norm cannot both be True (one normalisation after each hidden "
                             "Linear)")
        self.save_hyperparameters()
        layers: list[nn.Module] = []
        widths = [in_features, *hidden]
        for a, b in zip(widths[:-1], widths[1:]):
            if batch_norm or layer_norm:
                layers += [nn.Linear(a, b, bias=False), nn.BatchNorm1d(b) if batch_norm else nn.LayerNorm(b)]
            else:
                layers.append(nn.Linear(a, b))
            layers.append(nn.ReLU())
        layers.append(nn.Linear(widths[-1], num_classes))
        self.net = nn.Sequential(*layers)
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        x, y = batch
        logits = self(x)
        per_sample, num_tokens = per_sample_cross_entropy(logits, y)
        loss = per_sample.mean()
        self.log("train/loss", loss, prog_bar=True)
        return {"loss": loss, "per_sample_loss": per_sample, "num_tokens": num_tokens, "logits": logits}

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_acc.update(logits, y)
        self.log("val/loss", nn.functional.cross_entropy(logits, y))
        self.log("val/acc", self.val_acc, prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
