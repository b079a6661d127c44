"""LAWN as a callback: constrain the final layers' weight norms of any LightningModule.

Wraps what the module's ``configure_optimizers`` returns with
:class:`lightning_ext.optimizers.LAWN` (see there for the algorithm, the reconstruction and its
options). Target layers: explicit module names, or ``None`` for the last ``nn.Linear``/conv layer
of the module in registration order — the classifier head of the usual network — with a warning
naming the choice. A head with a bias is not homogeneous in its weight alone: the bias is left
unconstrained and a warning says so.
"""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
from torch import nn

from lightning_ext._checks import check_names
from lightning_ext.callbacks.base import Technique
from lightning_ext.callbacks.optimizer_diagnostics import log_diagnostics
from lightning_ext.callbacks.optimizer_injection import inject_wrapper
from lightning_ext.optimizers.lawn import LAWN as LAWNOptimizer
from lightning_ext.optimizers.lawn import LAWN_DEFAULTS, LAWNHyperparameters
from lightning_ext.surgery import select_modules, technique_of

_LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class LAWN(Technique):
    """Logit Attenuating Weight Normalization (arXiv 2108.05839) for any module's optimizer.

    Args:
        free_steps: optimizer steps before the constraint starts (>= 0).
        layers: module names to constrain (peft-style suffix match); ``None``: the last Linear/conv.
        norm_scope: ``"layer"`` or ``"row"``.
        constraint: ``"sphere"`` or ``"ball"``.
        project_grad: tangent-project the constrained gradients before each constrained step.
    """

    def __init__(self, free_steps: int, layers: list[str] | None = None, norm_scope: str = LAWN_DEFAULTS.norm_scope,
                 constraint: str = LAWN_DEFAULTS.constraint, project_grad: bool = LAWN_DEFAULTS.project_grad) -> None:
        super().__init__()
        LAWNHyperparameters(free_steps, norm_scope, constraint, project_grad)
        if isinstance(layers, str):
            raise ValueError(f"layers must be a list of module names, or None for the last Linear/conv layer; "
                             f"got {layers!r}")
        check_names("layers", layers, optional=True)
        self.free_steps, self.layers, self.norm_scope = free_steps, layers, norm_scope
        self.constraint, self.project_grad = constraint, project_grad
        self.optimizers: list[LAWNOptimizer] = []

    def _targets(self, pl_module: pl.LightningModule) -> list[tuple[str, nn.Module]]:
        if self.layers is not None:
            return select_modules(pl_module, self.layers, what="LAWN layers")
        candidates = select_modules(pl_module, types=_LAYER_TYPES, what="LAWN layers")
        name, module = candidates[-1]
        warnings.warn(f"LAWN constrains {name!r} ({type(module).__name__}), the module's last Linear/conv layer; "
                      "pass layers=[...] to choose the final homogeneous sub-network yourself", stacklevel=2)
        return [(name, module)]

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        # DeepSpeed ZeRO-1/2/3: LAWN rescales the fp32 master partitions exactly (optimizers/lawn.py)
        targets = self._targets(pl_module)
        for name, module in targets:
            _weight_of(name, module)
            if getattr(module, "bias", None) is not None:
                warnings.warn(f"LAWN: {name!r} has a bias, which breaks the homogeneity the constraint relies on; "
                              "the bias is left unconstrained", stacklevel=2)

        self.optimizers = []
        inject_wrapper(pl_module, lambda: [_weight_of(name, module) for name, module in targets],
                       lambda opt, mine: LAWNOptimizer(opt, mine, self.free_steps, self.norm_scope, self.constraint,
                                                       self.project_grad),
                       lambda wrapped: self.optimizers.append(wrapped), self)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        log_diagnostics(pl_module, self.optimizers)

    def state_dict(self) -> dict:
        """The technique state, plus under DeepSpeed each optimizer's recorded partition radii (identical on every
        rank; DeepSpeed's optimizer checkpoint has no place for them)."""
        state = super().state_dict()
        radii = [opt.partition_radii() for opt in self.optimizers]
        if any(radii):
            state["partition_radii"] = radii
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state = dict(state_dict)
        self._pending_radii = state.pop("partition_radii", None)
        super().load_state_dict(state)
        self._apply_radii()

    def _apply_radii(self) -> None:
        pending = getattr(self, "_pending_radii", None)
        if pending and len(pending) == len(self.optimizers):
            for opt, radii in zip(self.optimizers, pending):
                opt.load_partition_radii(radii)
            self._pending_radii = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._apply_radii()  # state restored before the optimizers existed


def _weight_of(name: str, module: nn.Module) -> nn.Parameter:
    """The layer's weight parameter, checked at setup and again when the optimizers are configured (a technique
    set up after LAWN may have reparameterized it in between)."""
    weight = getattr(module, "weight", None)
    if isinstance(weight, nn.Parameter):
        return weight
    owner = technique_of(module)
    if owner is not None:
        raise ValueError(f"LAWN and {owner} do not compose on {name!r}: {owner} made its weight a function of "
                         "other parameters, and LAWN constrains the norm of a weight parameter. Constrain another "
                         "layer (layers=...) or exclude this one from the other technique's targets")
    raise ValueError(f"LAWN layers: {name!r} ({type(module).__name__}) has no weight parameter")
