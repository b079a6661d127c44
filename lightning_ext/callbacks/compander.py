"""``WeightCompander``: learnable weight companding (Cakaj et al. 2023, arXiv 2306.16993) as a Lightning callback.

The function and the parametrization are in :mod:`lightning_ext.nn.compander` (the default compander is a
lightning_ext reconstruction — the paper's formula could not be confirmed; see there). In ``setup``, before the
optimizer exists, each selected layer's ``weight`` becomes ``f_φ(v)``; the optimizer's ``configure_optimizers``
result is wrapped so the compander hyper-parameters leave the user's param groups and get their own group,
with ``hyper_weight_decay`` (default 0) and ``hyper_lr`` (default: the first group's lr). Every ``log_every``
steps ``compander/alpha``, ``compander/beta`` (means over layers) and ``compander/small_weight_fraction``
(share of ``|w| < 0.1·std(w)``) are logged. ``remove_on_fit_end=True`` (or :meth:`WeightCompander.export`)
bakes the weights back into plain tensors.

YAML::

    trainer:
      callbacks:
        - class_path: lightning_ext.callbacks.WeightCompander
          init_args:
            compander: lightning_ext.nn.compander.AsinhCompander
            compander_args: {beta: 1.5, alpha_scale: 2.0}
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_ext._checks import check_bool, check_int, check_names, check_number, check_str
from lightning_ext.callbacks.base import Technique
from lightning_ext.callbacks.optimizer_injection import inject
from lightning_ext.nn.compander import DEFAULT_TYPES, apply_compander, compander_parameters, remove_compander

__all__ = ["WeightCompander"]


class WeightCompander(Technique):
    """Reparameterize weights as ``w = f_φ(v)`` with learnable compander hyper-parameters ``φ``.

    Args:
        targets: layer name patterns (peft's rules); default every layer of ``types``.
        types: layer types (default Linear and Conv1d/2d/3d weights; biases and norms are never companded).
        exclude: layer names left alone.
        compander: class (or class path) of the compander (default ``AsinhCompander``).
        compander_args: its init arguments (``alpha``, ``beta``, ``alpha_scale``, ``learnable``).
        per_layer: one set of hyper-parameters per layer (else one shared set).
        hyper_lr: learning rate of the hyper-parameter group (default: the first param group's).
        hyper_weight_decay: weight decay of that group (default 0).
        log_every: diagnostics period in steps (0 = never).
        remove_on_fit_end: bake ``f(v)`` into plain weights after training.
    """

    def __init__(self, targets: str | list[str] | None = None, types: list[str] | None = list(DEFAULT_TYPES),
                 exclude: str | list[str] | None = None,
                 compander: str = "lightning_ext.nn.compander.AsinhCompander",
                 compander_args: dict[str, Any] | None = None, per_layer: bool = True,
                 hyper_lr: float | None = None, hyper_weight_decay: float = 0.0, log_every: int = 50,
                 remove_on_fit_end: bool = False) -> None:
        super().__init__()
        check_names("targets", targets, optional=True)
        check_names("types", types, optional=True)
        check_names("exclude", exclude, optional=True, allow_empty=True)
        check_str("compander", compander)
        check_bool("per_layer", per_layer)
        check_number("hyper_lr", hyper_lr, 0.0, low_open=True, optional=True)
        check_number("hyper_weight_decay", hyper_weight_decay, 0.0)
        check_int("log_every", log_every, 0)
        check_bool("remove_on_fit_end", remove_on_fit_end)
        from lightning_ext.nn.compander import _resolve

        _resolve(compander)  # fail at construction on a bad class path
        self.targets, self.types, self.exclude = targets, types, exclude
        self.compander, self.compander_args, self.per_layer = compander, dict(compander_args or {}), per_layer
        self.hyper_lr, self.hyper_weight_decay = hyper_lr, hyper_weight_decay
        self.log_every, self.remove_on_fit_end = log_every, remove_on_fit_end
        self.companders: dict[str, nn.Module] = {}

    def prepare(self, model: nn.Module) -> dict[str, nn.Module]:
        """Register the companders (idempotent, all or nothing); usable without a Trainer."""
        self.companders = apply_compander(model, self.targets, self.types, self.exclude, self.compander,
                                          self.compander_args, self.per_layer)
        return self.companders

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self.prepare(pl_module)
        self._module = pl_module
        if stage == "fit":
            inject(pl_module, self._own_group, self)

    def _own_group(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        hyper = compander_parameters(self._module)
        ids = {id(p) for p in hyper}
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in ids]
        if hyper:
            lr = self.hyper_lr if self.hyper_lr is not None else optimizer.param_groups[0]["lr"]
            optimizer.add_param_group({"params": hyper, "lr": lr, "weight_decay": self.hyper_weight_decay})
        return optimizer

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if not self.log_every or step % self.log_every or not self.companders:
            return
        with torch.no_grad():
            comps = list({id(c): c for c in self.companders.values()}.values())
            small = []
            for name in self.companders:
                w = pl_module.get_submodule(name).weight
                small.append((w.abs() < 0.1 * w.std()).float().mean())
            pl_module.log_dict({"compander/alpha": torch.stack([c.alpha for c in comps]).mean(),
                                "compander/beta": torch.stack([c.beta for c in comps]).mean(),
                                "compander/small_weight_fraction": torch.stack(small).mean()},
                               on_step=True, on_epoch=False)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.remove_on_fit_end and not trainer.interrupted:
            self.export(pl_module)

    @staticmethod
    def export(model: nn.Module) -> list[str]:
        """Bake ``f(v)`` into plain ``weight`` tensors (``remove_parametrizations(leave_parametrized=True)``)."""
        return remove_compander(model)
