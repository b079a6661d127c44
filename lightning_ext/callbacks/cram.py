"""CrAM as a callback: make any LightningModule's optimizer compression-aware.

Wraps what ``configure_optimizers`` returns with :class:`lightning_ext.optimizers.CrAM` (see there
for the algorithm and where it differs from the reference). The prunable tensors are the module's
trainable tensors with ``ndim > 1`` (or those of the modules named in ``layers``); every
BatchNorm of the module is protected during the second pass.

CrAM evaluates the loss twice per step through the optimizer closure, which Lightning provides
only with automatic optimization under ``32-true``/``64-true``/``bf16-mixed`` precision and
without gradient accumulation. The other combinations are refused in ``setup``, naming both
parts: ``16-mixed`` (GradScaler calls the closure itself), ``bf16-true`` (perturb/restore need
fp32 weights), ``accumulate_grad_batches > 1`` (pass 2 would see only the last micro-batch),
manual optimization, DeepSpeed (the engine steps the optimizer without a closure) and FSDP (shards).
"""

from __future__ import annotations

import dataclasses

import lightning.pytorch as pl

from lightning_ext._checks import check_names
from lightning_ext.callbacks.base import Technique
from lightning_ext.callbacks.optimizer_diagnostics import log_diagnostics
from lightning_ext.callbacks.optimizer_injection import inject_wrapper
from lightning_ext.nn.pruning import batchnorm_modules
from lightning_ext.optimizers.cram import CRAM_DEFAULTS as _D
from lightning_ext.optimizers.cram import CrAM as CrAMOptimizer
from lightning_ext.optimizers.cram import CrAMHyperparameters
from lightning_ext.strategies.probe import strategy_info
from lightning_ext.surgery import select_modules

SUPPORTED_PRECISION = ("32-true", "64-true", "bf16-mixed", "32", "64")


class CrAM(Technique):
    """Compression-Aware Minimizer (ICLR 2023) around the module's own optimizer.

    Args:
        rho: perturbation radius (>= 0).
        sparsities: top-k sparsities drawn per step, each in [0, 1).
        compression: ``"topk"`` or ``"nm"`` (N:M patterns ``nm_patterns``).
        scope: top-k ``"global"`` or per ``"layer"``.
        nm_patterns: (N, M) pairs drawn per step for ``compression="nm"``.
        plus: CrAM+ (add the clean gradient).
        sparse_grad: mask the second pass's gradient.
        grad_norm: normalise the perturbation by the gradient norm.
        layers: module names whose weights are prunable (peft-style suffix match); default: all ndim > 1 tensors.
        seed: seed of the per-step sparsity draw.
    """

    def __init__(self, rho: float = _D.rho, sparsities: list[float] | None = None, compression: str = _D.compression,
                 scope: str = _D.scope, nm_patterns: list[list[int]] | None = None, plus: bool = _D.plus,
                 sparse_grad: bool = _D.sparse_grad, grad_norm: bool = _D.grad_norm, layers: list[str] | None = None,
                 seed: int = _D.seed) -> None:
        super().__init__()
        hp = CrAMHyperparameters(rho, _D.sparsities if sparsities is None else sparsities, compression, scope,
                                 _D.nm_patterns if nm_patterns is None else nm_patterns, plus, sparse_grad, grad_norm,
                                 seed)
        if isinstance(layers, str):
            raise ValueError(f"layers must be a list of module names, or None for every matrix; got {layers!r}")
        check_names("layers", layers, optional=True)
        self.kwargs = dataclasses.asdict(hp)
        self.kwargs["sparsities"], self.kwargs["nm_patterns"] = list(hp.sparsities), list(hp.nm_patterns)
        self.layers = layers
        self.optimizers: list[CrAMOptimizer] = []

    def _refuse_unsupported(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        stage = strategy_info(trainer).zero_stage
        if stage is not None:
            raise RuntimeError(f"CrAM with DeepSpeed (ZeRO stage {stage}) is not supported: the engine steps the "
                               "optimizer without a closure, and CrAM needs two passes per step. Use DDP.")
        if strategy_info(trainer).is_fsdp:
            raise RuntimeError("CrAM with FSDP is not supported: its perturbation and top-k masks act on whole "
                               "tensors, and FSDP hands the optimizer per-rank shards. Use DDP.")
        precision = str(trainer.precision)
        if precision not in SUPPORTED_PRECISION:
            raise RuntimeError(f"CrAM with precision={precision!r} is not supported: it needs Lightning's closure "
                               "path and fp32 weights to perturb and restore; use '32-true' or 'bf16-mixed'.")
        if trainer.accumulate_grad_batches != 1:
            raise RuntimeError(f"CrAM with accumulate_grad_batches={trainer.accumulate_grad_batches} is not "
                               "supported: its second pass would see only the last micro-batch. Use 1.")
        if not pl_module.automatic_optimization:
            raise RuntimeError("CrAM with manual optimization is not supported: it needs the closure that "
                               "automatic optimization passes to optimizer.step().")

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        self._refuse_unsupported(trainer, pl_module)
        layers = None if self.layers is None else select_modules(pl_module, self.layers, what="CrAM layers")

        def prunable() -> list:  # read when the optimizers are configured (after any sharding of the module)
            if layers is not None:
                return [m.weight for _, m in layers]
            return [p for p in pl_module.parameters() if p.requires_grad and p.dim() > 1]

        batchnorm = batchnorm_modules(pl_module)

        self.optimizers = []
        inject_wrapper(pl_module, prunable,
                       lambda opt, mine: CrAMOptimizer(opt, prunable=mine, batchnorm=batchnorm, **self.kwargs),
                       lambda wrapped: self.optimizers.append(wrapped), self)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        log_diagnostics(pl_module, self.optimizers)
