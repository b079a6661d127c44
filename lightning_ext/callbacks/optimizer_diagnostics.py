"""Log what optimizer wrappers report (their ``diagnostics()``: ``cram/sparsity``, ``lawn/radius_mean``, ...).

The CrAM and LAWN callbacks log the optimizers they built. An optimizer named in a YAML ``optimizer:`` section
(``lightning_ext.optimizers.cli.LAWN``) has no callback, so ``lightning-ext`` adds
:class:`OptimizerDiagnostics`, which logs every optimizer of the trainer that has a ``diagnostics()`` method and
that no technique callback already logs. Values go through ``LightningModule.log`` (on step, to the logger and
the live metrics), so they land in ``metrics.csv`` / TensorBoard under their technique's prefix.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import lightning.pytorch as pl

__all__ = ["OptimizerDiagnostics", "log_diagnostics"]


def log_diagnostics(pl_module: pl.LightningModule, optimizers: Iterable[Any]) -> None:
    for opt in optimizers:
        for name, value in opt.diagnostics().items():
            pl_module.log(name, value)


def _unwrapped(opt: Any) -> Any:
    return getattr(opt, "optimizer", opt)  # Lightning's LightningOptimizer holds the optimizer itself


class OptimizerDiagnostics(pl.Callback):
    """Log ``diagnostics()`` of the trainer's optimizers that no technique callback logs."""

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        logged = {id(o) for cb in trainer.callbacks for o in getattr(cb, "optimizers", ()) or ()}
        mine = [o for o in map(_unwrapped, trainer.optimizers) if hasattr(o, "diagnostics") and id(o) not in logged]
        log_diagnostics(pl_module, mine)
