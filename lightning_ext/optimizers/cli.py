"""LAWN and CrAM in LightningCLI's ``optimizer:`` section (params first, the base optimizer nested).

LightningCLI builds the ``optimizer:`` entry as ``cls(model.parameters(), **init_args)``, so the
class it names must take the parameters first. These subclasses do, build their base optimizer
from a nested ``class_path``, and are otherwise :class:`lightning_ext.optimizers.LAWN` /
:class:`lightning_ext.optimizers.CrAM`:

.. code-block:: yaml

    optimizer:
      class_path: lightning_ext.optimizers.cli.LAWN
      init_args:
        optimizer:
          class_path: torch.optim.AdamW
          init_args: {lr: 3.0e-3, weight_decay: 0.01}
        free_steps: 100
        constrained_last: 1      # the last matrix of model.parameters(): usually the classifier

The section sees parameters but not their names or modules, so target selection is positional
(LAWN: the last ``constrained_last`` tensors with ndim >= 2; CrAM: every tensor with ndim >= 2),
and CrAM cannot freeze BatchNorm running statistics during its perturbed pass. The callbacks
(:class:`lightning_ext.callbacks.LAWN`, :class:`lightning_ext.callbacks.CrAM`) select by name or
auto-detection and handle BatchNorm; prefer them when the module builds its own optimizer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch.optim import Optimizer

from lightning_ext._checks import check_int
from lightning_ext.optimizers import cram as _cram
from lightning_ext.optimizers import lawn as _lawn

__all__ = ["LAWN", "CrAM", "build_base_optimizer"]

_CD, _LD = _cram.CRAM_DEFAULTS, _lawn.LAWN_DEFAULTS  # the defaults are written once, there

OptimizerCallable = Callable[[Iterable], Optimizer]


def build_base_optimizer(params: Iterable, optimizer: OptimizerCallable | Mapping[str, Any]) -> Optimizer:
    """The base optimizer from a callable (jsonargparse's ``OptimizerCallable``) or a
    ``{"class_path": ..., "init_args": {...}}`` mapping (what LightningCLI passes un-instantiated)."""
    if isinstance(optimizer, Optimizer):
        raise TypeError("optimizer: pass the base optimizer's class (a class_path in YAML), not an instance; "
                        "to wrap an existing optimizer use lightning_ext.optimizers.LAWN/CrAM directly")
    if isinstance(optimizer, Mapping) or hasattr(optimizer, "class_path"):
        from lightning.pytorch.cli import instantiate_class

        spec = dict(optimizer) if isinstance(optimizer, Mapping) else dict(vars(optimizer))
        init_args = spec.get("init_args") or {}
        spec["init_args"] = dict(init_args) if isinstance(init_args, Mapping) else dict(vars(init_args))
        base = instantiate_class((params,), spec)
    elif callable(optimizer):
        base = optimizer(params)
    else:
        raise TypeError(f"optimizer must be a class_path mapping or a callable taking the parameters, got "
                        f"{type(optimizer).__name__}")
    if not isinstance(base, Optimizer):
        raise TypeError(f"optimizer built a {type(base).__name__}, not a torch.optim.Optimizer")
    return base


def _matrices(base: Optimizer) -> list[torch.Tensor]:
    return [p for g in base.param_groups for p in g["params"] if p.dim() >= 2]


class LAWN(_lawn.LAWN):
    """:class:`lightning_ext.optimizers.LAWN` built from parameters and a nested base optimizer.

    Args:
        params: the parameters (LightningCLI passes ``model.parameters()``).
        optimizer: the base optimizer class with its arguments (``class_path`` / ``init_args``).
        free_steps, norm_scope, constraint, project_grad: as in :class:`lightning_ext.optimizers.LAWN`.
        constrained_last: constrain the last this-many tensors with ndim >= 2, in parameter order (>= 1).
    """

    def __init__(self, params: Iterable, optimizer: OptimizerCallable, free_steps: int, constrained_last: int = 1,
                 norm_scope: str = _LD.norm_scope, constraint: str = _LD.constraint,
                 project_grad: bool = _LD.project_grad) -> None:
        check_int("constrained_last", constrained_last, 1)
        _lawn.LAWNHyperparameters(free_steps, norm_scope, constraint, project_grad)  # refuse before building
        base = build_base_optimizer(params, optimizer)
        matrices = _matrices(base)
        if len(matrices) < constrained_last:
            raise ValueError(f"constrained_last={constrained_last}, but the parameters hold only {len(matrices)} "
                             f"tensors with ndim >= 2 (shapes {[tuple(p.shape) for p in matrices]})")
        super().__init__(base, matrices[-constrained_last:], free_steps, norm_scope=norm_scope,
                         constraint=constraint, project_grad=project_grad)


class CrAM(_cram.CrAM):
    """:class:`lightning_ext.optimizers.CrAM` built from parameters and a nested base optimizer.

    Every parameter with ndim >= 2 is prunable; BatchNorm statistics are not frozen in the
    perturbed pass (use the callback for networks with BatchNorm).

    Args:
        params: the parameters (LightningCLI passes ``model.parameters()``).
        optimizer: the base optimizer class with its arguments (``class_path`` / ``init_args``).
        rho, sparsities, compression, scope, nm_patterns, plus, sparse_grad, grad_norm, seed: as in
            :class:`lightning_ext.optimizers.CrAM`.
    """

    def __init__(self, params: Iterable, optimizer: OptimizerCallable, rho: float = _CD.rho,
                 sparsities: Sequence[float] = _CD.sparsities, compression: str = _CD.compression,
                 scope: str = _CD.scope, nm_patterns: Sequence[tuple[int, int]] = _CD.nm_patterns,
                 plus: bool = _CD.plus, sparse_grad: bool = _CD.sparse_grad, grad_norm: bool = _CD.grad_norm,
                 seed: int = _CD.seed) -> None:
        _cram.CrAMHyperparameters(rho, sparsities, compression, scope, nm_patterns, plus, sparse_grad, grad_norm,
                                  seed)  # refuse before building the base optimizer
        base = build_base_optimizer(params, optimizer)
        super().__init__(base, rho=rho, sparsities=sparsities, compression=compression, scope=scope,
                         nm_patterns=nm_patterns, plus=plus, sparse_grad=sparse_grad, grad_norm=grad_norm, seed=seed)
